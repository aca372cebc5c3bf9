"""LlavaModel parity with transformers' LlavaForConditionalGeneration, both pixel layouts, packing,
KV cache and the error messages."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from llava_jax.models.llava import LlavaModel
from llava_jax.models.projector import Projector
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R

TOL = 1e-4
S = 16
FEATURE_CHOICES = {
    "default_negative_layer": dict(vision_feature_select_strategy="default", vision_feature_layer=-2),
    "full_strategy": dict(vision_feature_select_strategy="full", vision_feature_layer=-3),
    "list_of_layers": dict(vision_feature_select_strategy="default", vision_feature_layer=(0, -2)),
}


class Pair:
    def __init__(self, cfg, seed):
        self.cfg = cfg
        self.hf = R.hf_llava(cfg, seed=seed)
        self.ours = R.ours_from_hf(self.hf, cfg)
        self.fwd = R.jitted(self.ours)

    def hf_logits(self, ids, pixels=None, mask=None, positions=None):
        kw = dict(input_ids=R.to_torch(ids, torch.long))
        if pixels is not None:
            kw["pixel_values"] = R.nhwc_to_nchw(pixels)
        if mask is not None:
            kw["attention_mask"] = R.to_torch(mask, torch.long)
        if positions is not None:
            kw["position_ids"] = R.to_torch(positions, torch.long)
        with torch.no_grad():
            return self.hf(**kw).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FEATURE_CHOICES))
def choice(request):
    return Pair(tiny_llava_config(**FEATURE_CHOICES[request.param]), seed=4)


@pytest.fixture(scope="module")
def base():
    return Pair(tiny_llava_config(), seed=5)


def _images(n, seed=0):
    return np.random.RandomState(seed).randn(n, 28, 28, 3).astype(np.float32)


def _row(cfg, pieces, length=S, pad_left=False):
    """Token row from text runs and 'IMG' markers (each expands to num_image_tokens placeholders)."""
    toks = []
    for p in pieces:
        toks += [cfg.image_token_id] * cfg.num_image_tokens if p == "IMG" else list(p)
    pad = [cfg.pad_token_id] * (length - len(toks))
    mask = [0] * len(pad) + [1] * len(toks) if pad_left else [1] * len(toks) + [0] * len(pad)
    return (pad + toks if pad_left else toks + pad), mask


def _batch(cfg, rows, pad_left=()):
    built = [_row(cfg, r, pad_left=i in pad_left) for i, r in enumerate(rows)]
    ids = np.array([b[0] for b in built], np.int32)
    mask = np.array([b[1] for b in built], np.int32)
    return ids, mask


def test_logits_match_transformers_for_each_feature_choice(choice):
    cfg = choice.cfg
    ids, _ = _batch(cfg, [[(1, 9), "IMG", range(20, 20 + S - 2 - cfg.num_image_tokens)],
                          [(1,), "IMG", range(30, 30 + S - 1 - cfg.num_image_tokens)]])
    px = _images(2)
    ref = choice.hf_logits(ids, px)
    got = np.asarray(choice.fwd(ids, px))
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    feats = choice.ours.image_features(px)
    assert feats.shape == (2, cfg.num_image_tokens, cfg.text.hidden_size)


def _mixed_rows(cfg):
    return [[(1, 5, 6), "IMG", (7, 8, 9, 10)],      # image near the start
            [(1, 11, 12, 13, 14, 15, 16), "IMG"],   # image at the end, more padding
            [(1, 17, 18, 19, 20)]]                   # no image


@pytest.mark.parametrize("pad_left", [False, True], ids=["right_padding", "left_padding"])
def test_padded_batch_with_images_at_different_positions(base, pad_left):
    cfg = base.cfg
    ids, mask = _batch(cfg, _mixed_rows(cfg), pad_left=(0, 1, 2) if pad_left else ())
    px = _images(2, seed=1)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)  # what our default uses; HF is told explicitly
    ref = base.hf_logits(ids, px, mask, positions)
    got = np.asarray(base.fwd(ids, px, mask))
    real = mask == 1
    np.testing.assert_allclose(got[real], ref[real], atol=TOL, rtol=0)


def test_slots_layout_equals_flat_layout_and_transformers(base):
    cfg = base.cfg
    ids, mask = _batch(cfg, [[(1, 5), "IMG", (6,), "IMG"],  # two images in one row
                             [(1, 7, 8), "IMG", (9,)],
                             [(1, 10, 11, 12)]])
    a, b, c = _images(3, seed=2)
    flat = np.stack([a, b, c])
    zeros = np.zeros_like(a)
    slots = np.stack([np.stack([a, b]), np.stack([c, zeros]), np.stack([zeros, zeros])])  # (B, M, H, W, 3)
    got_flat = np.asarray(base.fwd(ids, flat, mask))
    got_slots = np.asarray(base.fwd(ids, slots, mask))
    real = mask == 1
    np.testing.assert_allclose(got_slots[real], got_flat[real], atol=1e-5, rtol=0)
    ref = base.hf_logits(ids, flat, mask)
    np.testing.assert_allclose(got_flat[real], ref[real], atol=TOL, rtol=0)


def test_packed_row_equals_samples_run_separately(base):
    cfg = base.cfg
    t = cfg.num_image_tokens
    first, _ = _row(cfg, [(1, 5), "IMG", (6, 7)], length=4 + t)
    second, _ = _row(cfg, [(1, 8, 9), "IMG", (10,)], length=S - 4 - t)
    ids = np.array([first + second], np.int32)
    segments = np.array([[1] * len(first) + [2] * len(second)], np.int32)
    positions = np.array([list(range(len(first))) + list(range(len(second)))], np.int32)
    a, b = _images(2, seed=3)
    packed = np.asarray(base.fwd(ids, np.stack([a, b])[None], segment_ids=segments, positions=positions))[0]
    # each sample alone, right-padded to the same length (the same compiled shapes)
    for ids_one, image, span in ((first, a, slice(0, len(first))), (second, b, slice(len(first), S))):
        row = np.array([ids_one + [0] * (S - len(ids_one))], np.int32)
        mask = np.array([[1] * len(ids_one) + [0] * (S - len(ids_one))], np.int32)
        alone = np.asarray(base.fwd(row, image[None, None], mask))[0, :len(ids_one)]
        np.testing.assert_allclose(packed[span], alone, atol=1e-5, rtol=0)


def test_kv_cache_decode_with_an_image_equals_full_forward(base):
    cfg = base.cfg
    # the images sit inside the 12-token prefill; decoding continues a right- and a left-padded row
    ids, mask = _batch(cfg, [[(1, 5, 6), "IMG", (7, 8, 9, 10, 11, 12, 13, 14)],
                             [(1, 11, 12), "IMG", (13, 14, 15, 16)]], pad_left=(1,))
    px = _images(2, seed=6)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    full = np.asarray(base.fwd(ids, px, mask))
    graphdef, state = nnx.split(base.ours)

    @jax.jit
    def step(state, ids, pixels, mask, positions, cache):
        return nnx.merge(graphdef, state)(ids, pixels, mask, positions=positions, cache=cache)

    prefill = 12
    logits, cache = step(state, ids[:, :prefill], px, mask[:, :prefill], positions[:, :prefill],
                         base.ours.init_cache(2, S))
    outs = [np.asarray(logits)]
    for i in range(prefill, S):
        logits, cache = step(state, ids[:, i:i + 1], None, mask[:, i:i + 1], positions[:, i:i + 1], cache)
        outs.append(np.asarray(logits))
    real = mask == 1
    np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=TOL, rtol=0)


def test_hidden_states_then_logits_equals_call(base):
    cfg = base.cfg
    ids, mask = _batch(cfg, _mixed_rows(cfg))
    px = _images(2, seed=1)
    h = R.jitted(base.ours, "hidden_states")(ids, px, mask)
    assert h.shape == (3, S, cfg.text.hidden_size)
    np.testing.assert_allclose(np.asarray(base.ours.logits_from_hidden(h)), np.asarray(base.fwd(ids, px, mask)),
                               atol=1e-5, rtol=0)


def test_unknown_projector_type_is_rejected():
    with pytest.raises(ValueError, match=r"unknown projector type 'mlp2x_relu'.*'linear', 'identity'.*mlp\{N\}x_gelu"):
        LlavaModel(tiny_llava_config(projector_type="mlp2x_relu"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind,depth", [("linear", 1), ("mlp3x_gelu", 3), ("mlp1x_gelu", 1)])
def test_projector_forms(kind, depth):
    proj = Projector(kind, 32, 64, rngs=nnx.Rngs(0))
    names = sorted(nnx.to_pure_dict(nnx.state(proj)))
    assert names == [f"linear_{i}" for i in range(1, depth + 1)]
    x = np.random.RandomState(0).randn(2, 4, 32).astype(np.float32)
    assert proj(x).shape == (2, 4, 64)
    ident = Projector("identity", 64, 64, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(ident(np.ones((1, 2, 64), np.float32))), np.ones((1, 2, 64)))
    with pytest.raises(ValueError, match="identity projector needs equal feature sizes"):
        Projector("identity", 32, 64, rngs=nnx.Rngs(0))


def test_placeholder_count_mismatch_names_both_counts(base):
    cfg = base.cfg
    t = cfg.num_image_tokens
    ids = np.array([[1] + [cfg.image_token_id] * (t - 1) + [5] * (S - t)], np.int32)
    with pytest.raises(ValueError, match=rf"{t - 1} placeholder tokens.*1 images x {t} tokens = {t} image features"):
        base.ours(ids, _images(1))
    ids2, _ = _batch(cfg, [[(1,), "IMG", "IMG"]])  # two images' placeholders, one image given
    with pytest.raises(ValueError, match=rf"{2 * t} placeholder tokens.*= {t} image features"):
        base.ours(ids2, _images(1))
    with pytest.raises(ValueError, match=rf"in row 0 .*{2 * t} placeholder tokens.*= {t} image features"):
        base.ours(ids2, _images(1)[None])
