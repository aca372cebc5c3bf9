"""LLaVA-1.6 (AnyRes) parity with transformers' LlavaNextForConditionalGeneration on tiny random weights:
images of different aspect ratios (different tile grids and token counts) in one batch, left and right
padding, a text-only row, the jitted layout path, and the error messages."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import skimage.data
import torch
from flax import nnx

from llava_jax.data import anyres
from llava_jax.hf.keys import load_into_model
from llava_jax.models import llava_next
from llava_jax.models.config import VisionConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R

TOL = 1e-5  # fp32
TILE = 28  # the tiny tower's input size: grids are the v1.6 pinpoints scaled by 28 / 336
PINPOINTS = tuple((h * TILE // 336, w * TILE // 336) for h, w in anyres.DEFAULT_GRID_PINPOINTS)
S = 104
# Patch 7: 4 x 4 features per tile, enough rows for the very wide and very tall images to keep some.
VISION = VisionConfig(image_size=TILE, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)


def next_config(**overrides):
    return tiny_llava_config(**{"image_grid_pinpoints": PINPOINTS, "vision": VISION, **overrides})


hf_llava_next = R.hf_llava_next
canonical = R.canonical_state_dict  # the llava-hf names, image_newline included


@pytest.fixture(scope="module")
def pair():
    cfg = next_config()
    hf = hf_llava_next(cfg, seed=7)
    ours = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    load_into_model(ours, canonical(hf), cfg, strict=True)
    return cfg, hf, ours


def _photos():
    return [skimage.data.astronaut(),                      # square: the 2 x 2 grid
            skimage.data.coffee()[:90],                    # very wide: 1 x 3
            skimage.data.rocket()[:, 250:330],             # very tall: 3 x 1
            skimage.data.chelsea()]                        # 3:2: 1 x 2


@pytest.fixture(scope="module")
def images():
    p = anyres.max_tiles(PINPOINTS, TILE)
    out = [anyres.preprocess_anyres(photo, PINPOINTS, size=TILE, num_tiles=p) for photo in _photos()]
    return np.stack([o[0] for o in out]), np.array([o[1] for o in out])


def _batch(cfg, sizes, rows, pad_left):
    """rows: lists of text tuples and image indices (each expands to that image's placeholder run)."""
    counts = [anyres.num_image_tokens(s, PINPOINTS, TILE, cfg.vision.patch_size) for s in sizes]
    ids, mask = [], []
    for pieces in rows:
        toks = []
        for p in pieces:
            toks += [cfg.image_token_id] * counts[p] if isinstance(p, int) else list(p)
        pad = S - len(toks)
        ids.append([cfg.pad_token_id] * pad + toks if pad_left else toks + [cfg.pad_token_id] * pad)
        mask.append([0] * pad + [1] * len(toks) if pad_left else [1] * len(toks) + [0] * pad)
    return np.array(ids, np.int32), np.array(mask, np.int32)


def _hf_logits(hf, ids, mask, pixels, sizes):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)  # our default; HF is told explicitly
    with torch.no_grad():
        out = hf(input_ids=R.to_torch(ids, torch.long), attention_mask=R.to_torch(mask, torch.long),
                 position_ids=R.to_torch(positions, torch.long),
                 pixel_values=R.to_torch(pixels.transpose(0, 1, 4, 2, 3)), image_sizes=R.to_torch(sizes, torch.long))
    return out.logits.numpy()


ROWS = [[(1, 5, 6), 0, (7, 8)],              # square image
        [(1, 9), 1, (10,), 2, (11, 12)],     # a very wide and a very tall image in one row
        [(1, 13, 14, 15, 16)],               # text only
        [(1,), 3, (17,)]]                    # 3:2 image


@pytest.mark.parametrize("pad_left", [False, True], ids=["right_padding", "left_padding"])
def test_logits_match_transformers(pair, images, pad_left):
    cfg, hf, ours = pair
    pixels, sizes = images
    ids, mask = _batch(cfg, sizes, ROWS, pad_left)
    counts = [anyres.num_image_tokens(s, PINPOINTS, TILE, VISION.patch_size) for s in sizes]
    assert len(set(counts)) == 4, counts  # every image has its own token count
    ref = _hf_logits(hf, ids, mask, pixels, sizes)
    got = np.asarray(R.jitted(ours, image_sizes=sizes)(ids, pixels, mask))
    real = mask == 1
    np.testing.assert_allclose(got[real], ref[real], atol=TOL, rtol=0)


def test_placeholder_features_equal_transformers_packing(pair, images):
    """The feature each placeholder receives equals transformers' packed image features, newline included."""
    cfg, hf, ours = pair
    pixels, sizes = images
    with torch.no_grad():
        packed = hf.model.get_image_features(R.to_torch(pixels.transpose(0, 1, 4, 2, 3)),
                                             R.to_torch(sizes, torch.long)).pooler_output
    ref = torch.cat(packed).numpy()
    side = cfg.vision.image_size // cfg.vision.patch_size
    layouts = llava_next.layouts_from_sizes(sizes, cfg)
    is_image = np.ones((1, ref.shape[0]), bool)
    n, p = pixels.shape[:2]
    feats = ours.image_features(pixels.reshape(n * p, *pixels.shape[2:])).reshape(n, p, side * side, -1)
    got = llava_next.gather_features(feats, ours.projector.image_newline[...], layouts, is_image, side)[0]
    np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=0)


def test_one_compiled_program_serves_every_mix_of_sizes(pair, images):
    """Layouts are traced data: new image sizes reuse the compiled program (no retrace)."""
    cfg, hf, ours = pair
    pixels, sizes = images
    graphdef, state = nnx.split(ours)
    traces = []

    @jax.jit
    def fwd(state, ids, pixels, mask, layouts):
        traces.append(1)
        return nnx.merge(graphdef, state)(ids, pixels, mask, image_sizes=layouts)

    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        s = sizes[order]
        ids, mask = _batch(cfg, s, ROWS, pad_left=False)
        got = np.asarray(fwd(state, ids, pixels[order], mask, llava_next.layouts_from_sizes(s, cfg)))
        ref = _hf_logits(hf, ids, mask, pixels[order], s)
        np.testing.assert_allclose(got[mask == 1], ref[mask == 1], atol=TOL, rtol=0)
    assert len(traces) == 1


def test_errors_name_the_problem(pair, images):
    cfg, _, ours = pair
    pixels, sizes = images
    ids, mask = _batch(cfg, sizes, ROWS, pad_left=False)
    with pytest.raises(ValueError, match="AnyRes models need image_sizes"):
        ours(ids, pixels, mask)
    extra = ids.copy()
    extra[2, 1] = cfg.image_token_id  # one stray placeholder in the text-only row
    with pytest.raises(ValueError, match="placeholder count mismatch"):
        ours(extra, pixels, mask, image_sizes=sizes)
    with pytest.raises(ValueError, match="tile slots"):
        ours(ids, pixels[:, :3], mask, image_sizes=sizes)
    with pytest.raises(ValueError, match=r"\(N, tiles, H, W, 3\)"):
        ours(ids, pixels[:, 0], mask, image_sizes=sizes)
    with pytest.raises(ValueError, match="multiple of its image_size 28"):
        next_config(image_grid_pinpoints=((28, 50),))
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'default'"):
        next_config(vision_feature_select_strategy="full")


def test_greedy_tokens_equal_transformers_generate(pair, images):
    """Prefill with the KV cache (images of different aspect ratios, left padding), then greedy decode:
    the same tokens as transformers' generate."""
    cfg, hf, ours = pair
    pixels, sizes = images
    pick = [1, 2]  # a very wide and a very tall image: different grids and token counts
    rows = [[(1, 5, 6), 0, (7, 8)], [(1, 9), 1, (10, 11, 12)]]
    ids, mask = _batch(cfg, sizes[pick], rows, pad_left=True)
    steps = 6
    with torch.no_grad():
        ref = hf.generate(input_ids=R.to_torch(ids, torch.long), attention_mask=R.to_torch(mask, torch.long),
                          pixel_values=R.to_torch(pixels[pick].transpose(0, 1, 4, 2, 3)),
                          image_sizes=R.to_torch(sizes[pick], torch.long), max_new_tokens=steps, do_sample=False,
                          pad_token_id=cfg.pad_token_id, eos_token_id=None)[:, S:].numpy()
    graphdef, state = nnx.split(ours)

    @jax.jit
    def prefill(state, ids, pixels, mask, layouts):
        model = nnx.merge(graphdef, state)
        positions = jax.numpy.maximum(jax.numpy.cumsum(mask, axis=1) - 1, 0)
        logits, cache = model(ids, pixels, mask, segment_ids=mask, positions=positions,
                              cache=model.init_cache(ids.shape[0], S + steps), image_sizes=layouts)
        return logits[:, -1].argmax(-1), positions[:, -1] + 1, cache

    @jax.jit
    def decode(state, token, position, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], segment_ids=jax.numpy.ones_like(token)[:, None],
                                                   positions=position[:, None], cache=cache)
        return logits[:, -1].argmax(-1), position + 1, cache

    token, position, cache = prefill(state, ids, pixels[pick], mask, llava_next.layouts_from_sizes(sizes[pick], cfg))
    got = [np.asarray(token)]
    for _ in range(steps - 1):
        token, position, cache = decode(state, token, position, cache)
        got.append(np.asarray(token))
    np.testing.assert_array_equal(np.stack(got, axis=1), ref)


def test_slot_layout_and_packing(pair, images):
    """Training layout (B, M, P, H, W, 3) with (B, M, 2) sizes, (0, 0) for an empty slot, equals the flat
    layout (transformers' logits); a packed row (two samples, own segments and positions) equals the
    samples run alone."""
    cfg, hf, ours = pair
    pixels, sizes = images
    ids, mask = _batch(cfg, sizes, ROWS, pad_left=False)
    flat = _hf_logits(hf, ids, mask, pixels, sizes)  # what the flat layout gives (test_logits_match_transformers)
    zeros, none = np.zeros_like(pixels[0]), np.zeros(2, sizes.dtype)
    slots = np.stack([np.stack([pixels[0], zeros]), np.stack([pixels[1], pixels[2]]), np.stack([zeros, zeros]),
                      np.stack([pixels[3], zeros])])
    slot_sizes = np.stack([[sizes[0], none], [sizes[1], sizes[2]], [none, none], [sizes[3], none]])
    got = np.asarray(R.jitted(ours, image_sizes=slot_sizes)(ids, slots, mask))
    real = mask == 1
    np.testing.assert_allclose(got[real], flat[real], atol=1e-5, rtol=0)

    # Pack rows 0 and 3 into one row: segments 1 and 2, positions restarting at 0.
    a, b = ids[0][mask[0] == 1], ids[3][mask[3] == 1]
    packed = np.concatenate([a, b])[None]
    segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b))])[None].astype(np.int32)
    layouts = llava_next.layouts_from_sizes(np.stack([[sizes[0], sizes[3]]]), cfg)
    merged = np.asarray(R.jitted(ours)(packed, np.stack([[pixels[0], pixels[3]]]), segment_ids=segments,
                                       positions=positions, image_sizes=layouts))
    np.testing.assert_allclose(merged[0, :len(a)], flat[0][mask[0] == 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(merged[0, len(a):], flat[3][mask[3] == 1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="placeholder count mismatch in row 2"):
        bad = ids.copy()
        bad[2, 1] = cfg.image_token_id
        ours(bad, slots, mask, image_sizes=slot_sizes)
