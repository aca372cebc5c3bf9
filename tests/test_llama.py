"""LLaMA decoder parity with transformers' LlamaForCausalLM, and KV-cache decoding."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llava_jax.models import layers as L
from llava_jax.models.config import RopeScaling
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing import hf_reference as R

TOL = 1e-4

VARIANTS = {
    "gqa_untied": {},
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling=RopeScaling("linear", factor=4.0)),
    # original length 32 puts this head_dim's wavelengths in all three llama3 bands
    "rope_llama3": dict(rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=32)),
}


def _config(**text):
    cfg = tiny_llava_config()
    return cfg.replace(text=dataclasses.replace(cfg.text, **text))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    cfg = _config(**VARIANTS[request.param])
    hf = R.hf_llama(cfg, seed=2)
    return cfg, hf, R.ours_from_hf(hf, cfg)


@pytest.fixture(scope="module")
def base_pair():
    cfg = _config()
    hf = R.hf_llama(cfg, seed=3)
    return cfg, hf, R.ours_from_hf(hf, cfg)


def _ids(batch, seq, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(1, vocab, (batch, seq)).astype(np.int32)


def test_logits_match_transformers(pair):
    cfg, hf, ours = pair
    ids = _ids(2, 40)  # long enough that scaled and unscaled RoPE differ visibly
    with torch.no_grad():
        ref = hf(R.to_torch(ids, torch.long)).logits.numpy()
    got = np.asarray(R.jitted(ours)(ids))
    assert got.dtype == np.float32 and got.shape == (2, 40, cfg.text.vocab_size)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert ("lm_head" in nnx.state(ours)) != cfg.text.tie_word_embeddings


def test_rope_frequencies_match_transformers(pair):
    """Our inverse frequencies are HF's, and the scaled variants really differ from plain RoPE
    (so the logits parity above is not vacuous)."""
    cfg, hf, _ = pair
    t = cfg.text
    ours = L.rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling)
    np.testing.assert_allclose(ours, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6, atol=0)
    plain = L.rope_inv_freq(t.head_dim, t.rope_theta, None)
    if t.rope_scaling is not None:
        assert not np.allclose(ours, plain)
        if t.rope_scaling.rope_type == "llama3":  # high frequencies kept, low ones divided by the factor
            assert ours[0] == plain[0] and np.isclose(ours[-1], plain[-1] / 8.0)


def test_padded_batch_matches_transformers(base_pair):
    """Right- and left-padded rows: HF gets the attention mask and position_ids = cumsum(mask) - 1."""
    _, hf, ours = base_pair
    ids = _ids(3, 12, seed=1)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0   # right padding
    mask[2, :5] = 0   # left padding
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(R.to_torch(ids, torch.long), attention_mask=R.to_torch(mask, torch.long),
                 position_ids=R.to_torch(positions, torch.long)).logits.numpy()
    got = np.asarray(R.jitted(ours)(ids, mask))
    real = mask == 1
    np.testing.assert_allclose(got[real], ref[real], atol=TOL, rtol=0)


def _decode_step(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, mask, positions, cache):
        return nnx.merge(graphdef, state)(ids, mask, positions=positions, cache=cache)

    return lambda *a: step(state, *a)


def test_kv_cache_prefill_then_token_by_token_equals_full_forward(base_pair):
    cfg, _, ours = base_pair
    ids = _ids(2, 14, seed=4)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row, as batched generation makes it
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    full = np.asarray(R.jitted(ours)(ids, mask))

    step = _decode_step(ours)
    prefill = 8
    cache = ours.init_cache(2, 16)
    logits, cache = step(ids[:, :prefill], mask[:, :prefill], positions[:, :prefill], cache)
    outs = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(ids[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1], cache)
        outs.append(np.asarray(logits))
    cached = np.concatenate(outs, axis=1)
    assert int(cache["index"]) == ids.shape[1]
    # the stacked model keeps one LayerCache of stacked (L, B * KVH, T, hd) buffers
    assert cache["layers"].k.shape == (cfg.text.num_layers, 2 * cfg.text.num_kv_heads, 16, cfg.text.head_dim)
    np.testing.assert_array_equal(np.asarray(cache["segment"])[:, :14], mask)
    real = mask == 1
    np.testing.assert_allclose(cached[real], full[real], atol=TOL, rtol=0)


def test_cache_requires_positions(base_pair):
    _, _, ours = base_pair
    with pytest.raises(ValueError, match="positions must be passed"):
        ours(_ids(1, 3), cache=ours.init_cache(1, 4))


def test_remat_policies_give_the_same_gradients(base_pair):
    """jax.checkpoint inside the layer scan changes memory, never values."""
    cfg, _, ours = base_pair
    ids = jnp.asarray(_ids(2, 8, seed=5))
    graphdef, state = nnx.split(ours)

    def loss(params, policy):
        model = nnx.merge(graphdef, params)
        model.remat_policy = policy
        return jnp.mean(model(ids) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = grad(state, "none")
    for policy in L.REMAT_POLICIES:
        for a, b in zip(jax.tree.leaves(grad(state, policy)), jax.tree.leaves(plain)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5, err_msg=policy)


def test_named_remat_policy_keeps_only_the_attention_inputs(base_pair):
    """save_qkv_proj keeps the rotated q, k and v of every layer for the backward pass, on top of what
    nothing_saveable keeps (the layer inputs): exactly layers x (q + k + v) more residual elements."""
    from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints

    cfg, _, ours = base_pair
    rows, length = 2, 8
    ids = jnp.asarray(_ids(rows, length, seed=5))
    graphdef, state = nnx.split(ours)

    def residual_elements(policy):
        def loss(params):
            model = nnx.merge(graphdef, params)
            model.remat_policy = policy
            return jnp.mean(model(ids) ** 2)

        return sum(aval.size for aval, _ in saved_residuals(loss, state))

    t = cfg.text
    qkv = rows * length * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
    assert residual_elements("save_qkv_proj") - residual_elements("nothing_saveable") == t.num_layers * qkv
