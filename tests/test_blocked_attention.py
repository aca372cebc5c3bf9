"""The blocked causal attention of the XLA path (`layers.blocked_causal_attention`: query block i
attends to the key prefix up to its end, so fully masked causal blocks are never computed) equals
the dense path (`layers.dot_product_attention` with the dense mask) on packed, padded, GQA/MQA and
one-segment cases, with lengths that the block does not divide, values and gradients; and 'auto'
picks it on CPU for causal calls of two or more query blocks.

Tolerances, relative to the largest reference value: float32 1e-5 (the two paths add the same
nonzero float32 terms in a different order; measured <= 6e-7). bfloat16 inputs 5e-3, just over one
bf16 rounding step (2^-8) of the largest value: both round the same float32 results to bf16 once,
and a reordered float32 sum can round to the neighbouring bf16 number (measured <= 8e-5).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models import layers as L
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.attention import assert_grads_close, logits_and_grads


def _qkv(b, s, h, kvh, hd, dtype, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda n: jnp.asarray(rng.standard_normal((b, s, n, hd)), dtype)
    return make(h), make(kvh), make(kvh)


def _segments(kind, b, s):
    """Segment ids (B, S) (0 = padding), or None for one segment per row."""
    if kind is None:
        return None
    seg = np.ones((b, s), np.int32)
    if kind == "packed":  # three samples then right padding in row 0; two samples filling row 1
        seg[0, 50:131], seg[0, 131:170], seg[0, 170:] = 2, 3, 0
        seg[1, 64:] = 2
    elif kind == "left_padded":  # generation-style prompts: padding first
        seg[0, :37], seg[1, :130] = 0, 0
    elif kind == "right_padded":
        seg[0, 150:], seg[1, 3:] = 0, 0
    return jnp.asarray(seg)


def _dense(q, k, v, seg):
    if seg is None:
        seg = jnp.ones(q.shape[:2], jnp.int32)
    return L.dot_product_attention(q, k, v, L.self_attention_mask(seg, causal=True, impl="xla"))


def _blocked(block):
    return lambda q, k, v, seg: L.blocked_causal_attention(q, k, v, seg, block=block)


def _loss(attention, seg, weights):
    """A scalar over real (non-padding) query rows only: padding outputs are unspecified."""
    real = jnp.ones(weights.shape[:2]) if seg is None else (seg != 0).astype(jnp.float32)

    def f(q, k, v):
        out = attention(q, k, v, seg).astype(jnp.float32)
        return jnp.sum(out * weights * real[:, :, None, None])
    return f


def _close(got, ref, rel, what):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    scale = float(np.abs(ref).max())
    assert scale > 0.1, what  # the comparison is not vacuous
    np.testing.assert_allclose(got, ref, atol=rel * scale, rtol=0, err_msg=what)


FP32, BF16 = (jnp.float32, 1e-5), (jnp.bfloat16, 5e-3)
CASES = [  # (segments, S, block, heads, kv heads, dtype)
    ("packed", 200, 64, 4, 2, FP32),  # GQA; 200 = 3 x 64 + 8: a short last block
    ("packed", 200, 64, 4, 2, BF16),
    ("left_padded", 200, 48, 2, 1, FP32),  # MQA; whole padding blocks at the start of row 1
    ("right_padded", 173, 64, 4, 4, FP32),
    ("right_padded", 173, 64, 4, 4, BF16),
    (None, 77, 32, 6, 2, FP32),
    (None, 77, 128, 2, 2, FP32),  # one block longer than the sequence: the dense path itself
]


@pytest.mark.parametrize("segments,s,block,h,kvh,tol", CASES)
def test_blocked_equals_dense_attention(segments, s, block, h, kvh, tol):
    dtype, rel = tol
    b, hd = 2, 32
    q, k, v = _qkv(b, s, h, kvh, hd, dtype)
    seg = _segments(segments, b, s)
    real = np.ones((b, s), bool) if seg is None else np.asarray(seg) != 0

    ref = _dense(q, k, v, seg)
    out = jax.jit(_blocked(block))(q, k, v, seg)
    assert out.shape == q.shape and out.dtype == dtype
    _close(np.asarray(out.astype(jnp.float32))[real], np.asarray(ref.astype(jnp.float32))[real], rel, "output")

    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads_ref = jax.jit(jax.grad(_loss(_dense, seg, weights), argnums=(0, 1, 2)))(q, k, v)
    grads = jax.jit(jax.grad(_loss(_blocked(block), seg, weights), argnums=(0, 1, 2)))(q, k, v)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        _close(g.astype(jnp.float32), g_ref.astype(jnp.float32), rel, f"d{name}")


def test_blocked_attention_skips_masked_blocks():
    """4 query blocks compute 10 of the 16 score blocks: XLA's cost analysis of the compiled
    forward counts ~10/16 of the dense one's FLOPs (the products dominate)."""
    b, s, h, hd = 2, 512, 4, 64
    q, k, v = _qkv(b, s, h, h, hd, jnp.float32)
    seg = jnp.ones((b, s), jnp.int32)

    def flops(f):
        cost = jax.jit(f).lower(q, k, v, seg).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    ratio = flops(_blocked(128)) / flops(_dense)
    assert 0.55 < ratio < 0.7, ratio


def test_auto_picks_blocked_attention_for_long_causal_calls():
    n = L.QUERY_BLOCK
    assert L.resolve_attention_impl("auto", seq_len=2 * n, causal=True) == "xla_blocked"  # this CPU
    assert L.resolve_attention_impl("auto", seq_len=2 * n - 1, causal=True) == "xla"  # one block: dense
    assert L.resolve_attention_impl("auto", seq_len=4 * n, causal=False) == "xla"  # nothing masked
    assert L.resolve_attention_impl("xla", seq_len=4 * n, causal=True) == "xla"
    assert L.resolve_attention_impl("xla_blocked", seq_len=8, causal=True) == "xla_blocked"
    assert L.resolve_attention_impl("xla_blocked", seq_len=4 * n, causal=False) == "xla"

    seg = jnp.ones((1, 2 * n), jnp.int32)
    mask = L.self_attention_mask(seg, causal=True)
    assert isinstance(mask, L.SegmentMask) and mask.kernel == "xla_blocked"
    assert L.self_attention_mask(seg, causal=True, impl="xla").shape == (1, 2 * n, 2 * n)
    assert L.self_attention_mask(None, causal=False, impl="xla_blocked") is None
    assert tiny_llava_config(attention_impl="xla_blocked").attention_impl == "xla_blocked"


def test_model_logits_and_gradients_equal_with_blocked_attention(monkeypatch):
    """The whole tiny LLaVA (GQA decoder in a remat'ed layer scan, packed batch of 40 tokens) with
    attention_impl 'xla_blocked' in 16-token blocks vs 'xla'."""
    monkeypatch.setattr(L, "QUERY_BLOCK", 16)
    real, out = logits_and_grads(("xla", "xla_blocked"))
    (logits_ref, grads_ref), (logits, grads) = out["xla"], out["xla_blocked"]
    _close(logits[real], logits_ref[real], 1e-5, "logits")
    assert_grads_close(grads, grads_ref)
