"""Building blocks shared by the CLIP tower, the projector and the LLaMA decoder.

Parameters are float32 and carry logical axis names (`out_sharding=`) that llava_jax.sharding maps
onto the mesh; every module computes in the `dtype` it was built with.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import sharding
from llava_jax.models.config import ATTENTION_IMPL_NAMES

Axes = tuple  # logical axis names, one per array dimension

ACT_SHAPE = ("act_batch", "act_seq", "act_embed")

# The attention inputs a decoder layer names with `jax.ad_checkpoint.checkpoint_name` (after the
# rotary embedding): the policies below keep them so that the backward pass does not redo the three
# projections, either in device memory or, where the chip has host memory it can reach (TPU v4 / v5e /
# v5p), in pinned host memory.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")

# Name -> jax.checkpoint policy; 'none' means layers are not rematerialised at all.
REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*QKV_NAMES),
    "offload_qkv_proj": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=QKV_NAMES,
        offload_src="device", offload_dst="pinned_host"),
}


def normal_init(std: float = 0.02):
    return jax.nn.initializers.normal(std)


def param(rngs: nnx.Rngs, init, shape, axes: Axes) -> nnx.Param:
    """A float32 parameter with its logical axis names attached as metadata."""
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=tuple(axes))


# ----- dense layers, embeddings, norms -------------------------------------------------------

def matmul(x, w):
    """x (..., in) @ w (in, out), both in the compute dtype, the result (..., out) in that dtype.

    The product runs over (rows, in) with every leading axis folded into rows: for (B, S, in)
    inputs the weight gradient would contract two axes, and XLA:CPU first copies the activations
    into a transposed layout (BENCHMARKS.md §1).

    A low-precision (bfloat16) product accumulates in float32, in the forward pass and in both
    gradients, and rounds once at the end: XLA:CPU runs bf16 x bf16 -> f32 on AMX at several times
    its fp32 rate but bf16 x bf16 -> bf16 only at about the fp32 rate (issue #19), and a TPU's MXU
    accumulates in f32 either way. float32 operands take the plain product."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        y = jnp.dot(rows, w)
    else:
        y = _f32_accumulated_matmul(rows, w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def _f32_accumulated_matmul(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _f32_accumulated_matmul_fwd(x, w):
    return _f32_accumulated_matmul(x, w), (x, w)


def _f32_accumulated_matmul_bwd(residuals, g):
    # Autodiff of the forward would hand these products a float32 cotangent (the transpose of its
    # final cast) and so run them as f32 x bf16; here both stay bf16 x bf16 -> f32.
    x, w = residuals
    f32 = jnp.float32
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_f32_accumulated_matmul.defvjp(_f32_accumulated_matmul_fwd, _f32_accumulated_matmul_bwd)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored (in, out)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, normal_init(), (in_features, out_features), axes)
        self.bias = param(rngs, jax.nn.initializers.zeros, (out_features,), axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def quantize_int8(kernel):
    """(..., in, out) float -> (int8 kernel, float32 scale (..., out)): symmetric per output channel,
    max-abs / 127 (LoRA's int8 base and the int8 inference weights)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=-2) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(kernel / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


# Lighter decoder kernels for generation (`layout.DecoderLayout.weights`). Both compute a single-row
# matmul as a two-row one: XLA's CPU backend sends a 1-row product with non-float32 operands to a
# slow matrix-vector routine (tens of times slower than the 2-row product on the benchmark CPU).
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")


def _rows_matmul(x, kernel, preferred):
    """x (..., in) @ kernel (in, out) with the leading dims flattened, at least two rows."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    single = rows.shape[0] == 1
    if single:
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    y = jnp.dot(rows, kernel, preferred_element_type=preferred)
    if single:
        y = y[:1]
    return y.reshape(*lead, kernel.shape[-1])


class Bf16Dense(nnx.Module):
    """A bias-free Dense whose kernel is stored in bfloat16; bfloat16 x bfloat16 products
    accumulated in float32."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, dtype=jnp.float32, rngs: nnx.Rngs):
        kernel = normal_init()(rngs.params(), (in_features, out_features), jnp.float32)
        self.kernel = nnx.Param(kernel.astype(jnp.bfloat16), out_sharding=tuple(axes))
        self.dtype = dtype

    def __call__(self, x):
        return _rows_matmul(x.astype(jnp.bfloat16), self.kernel[...], jnp.float32).astype(self.dtype)


class Int8Dense(nnx.Module):
    """A bias-free Dense with an int8 kernel and one float32 `scale` per output channel
    (`quantize_int8`); the input is quantized per row on the fly (max |x| / 127), an int8 x int8 ->
    int32 matmul follows, then both scales. XLA's CPU backend runs that matmul on the VNNI int8
    units; a weight-only int8 kernel (converted to bf16/f32 before the matmul) measured no faster
    than float32 on the benchmark CPU, because the conversion is not fused into the matmul."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, dtype=jnp.float32, rngs: nnx.Rngs):
        kernel, scale = quantize_int8(normal_init()(rngs.params(), (in_features, out_features), jnp.float32))
        self.kernel = nnx.Param(kernel, out_sharding=tuple(axes))
        self.scale = nnx.Param(scale, out_sharding=tuple(axes[1:]))
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x_scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
        x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
        xq = jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8)
        y = _rows_matmul(xq, self.kernel[...], jnp.int32).astype(jnp.float32)
        return (y * x_scale * self.scale[...]).astype(self.dtype)


def dense(in_features: int, out_features: int, *, axes: Axes, weights: str = "float32", dtype=jnp.float32,
          rngs: nnx.Rngs):
    """A bias-free projection whose kernel is held as `weights` (WEIGHT_DTYPES): Dense, Bf16Dense or Int8Dense."""
    kind = {"float32": Dense, "bfloat16": Bf16Dense, "int8": Int8Dense}[weights]  # checked by DecoderLayout
    return kind(in_features, out_features, axes=axes, dtype=dtype, rngs=rngs)


class Embed(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"),
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = param(rngs, normal_init(), (num_embeddings, features), axes)
        self.dtype = dtype

    def __call__(self, ids):
        # Gather the fsdp-split embed axis first (as FSDP does for every weight); a lookup into a
        # table split along both axes makes the partitioner replicate the whole table.
        table = sharding.constrain(self.embedding[...], ("vocab", None))
        out = jnp.take(table, ids, axis=0).astype(self.dtype)
        return sharding.constrain(out, ACT_SHAPE)

    def attend(self, x):
        """Tied output projection: x @ embedding.T."""
        return matmul(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in float32 (as torch does for fp16/bf16 inputs)."""

    def __init__(self, features: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, jax.nn.initializers.ones, (features,), ("norm",))
        self.bias = param(rngs, jax.nn.initializers.zeros, (features,), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalise in float32, cast to the compute dtype, then scale (HF order)."""

    def __init__(self, features: int, eps: float, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, jax.nn.initializers.ones, (features,), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


# ----- activations and MLPs -------------------------------------------------------------------

def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class FeedForward(nnx.Module):
    """fc1 -> activation -> fc2 with biases (the CLIP MLP)."""

    def __init__(self, features: int, hidden: int, act: str, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = Dense(features, hidden, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, features, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x):
        h = sharding.constrain(self.act(self.fc1(x)), ("act_batch", "act_seq", "act_mlp"))
        return self.fc2(h)


class GatedMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases (the LLaMA MLP)."""

    def __init__(self, features: int, hidden: int, *, weights: str = "float32", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(weights=weights, dtype=dtype, rngs=rngs)  # weights: how the kernels are held (`dense`)
        self.gate_proj = dense(features, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = dense(features, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = dense(hidden, features, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = sharding.constrain(h, ("act_batch", "act_seq", "act_mlp"))
        return self.down_proj(h)


# ----- rotary position embeddings -----------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,), float32, with 'linear' or 'llama3' scaling (HF formulas)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {scaling.rope_type!r}; expected 'linear' or 'llama3'")


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (the HF layout). x (B, S, H, hd), positions (B, S) int."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # (B, S, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----- attention ------------------------------------------------------------------------------

def attention_mask(q_segment, kv_segment, q_index=None, kv_index=None):
    """Boolean (B, S, T): same nonzero segment and, when slot indices are given, kv_index <= q_index.

    q_index (S,) and kv_index (T,) are slot numbers in the key/value sequence (not RoPE positions),
    so the same rule serves padded, packed and cached calls.
    """
    mask = (q_segment[:, :, None] == kv_segment[:, None, :]) & (q_segment[:, :, None] != 0)
    if q_index is not None:
        mask = mask & (kv_index[None, None, :] <= q_index[None, :, None])
    return mask


# model config `attention_impl`: 'auto' is the splash kernel on TPU; elsewhere XLA's attention,
# blocked (`blocked_causal_attention`: the fully masked causal blocks are never computed) for causal
# calls of at least two query blocks, dense otherwise. 'xla' (dense), 'xla_blocked' and 'splash'
# force one (splash off TPU runs the kernel in interpret mode: tests; 'xla_blocked' is dense for
# non-causal calls, where no block is ever fully masked).
ATTENTION_IMPLS = ATTENTION_IMPL_NAMES

# Query block of the blocked XLA attention. Query block i multiplies with keys [0, end of block i):
# with n blocks it computes (n + 1) / 2n of the dense scores. One layer's attention fwd+bwd at
# 4 x 512 tokens, 8 heads of 64, fp32 on the 2-core AMD EPYC of BENCHMARKS.md: 0.21 CPU-s dense,
# 0.13 / 0.12 / 0.14 with blocks of 64 / 128 / 256 (smaller blocks: more, smaller matmuls).
QUERY_BLOCK = 128


def _platform() -> str:
    """The platform the computation is being built for: the active mesh's devices (an AOT compile
    for a TPU topology traces on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def resolve_attention_impl(impl: str, *, seq_len: int = 0, causal: bool = False) -> str:
    """'auto' | 'xla' | 'xla_blocked' | 'splash' -> the implementation of one self-attention call of
    seq_len tokens: 'splash' (TPU), 'xla_blocked' (causal and >= 2 query blocks), else 'xla'."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {list(ATTENTION_IMPLS)}")
    if impl == "auto":
        if _platform() == "tpu":
            return "splash"
        return "xla_blocked" if causal and seq_len >= 2 * QUERY_BLOCK else "xla"
    if impl == "xla_blocked" and not causal:
        return "xla"
    return impl


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """The self-attention mask as data for an implementation that applies it block by block (the
    splash kernel, or `blocked_causal_attention` when `kernel` is 'xla_blocked'): token q sees k iff
    segment[q] == segment[k] != 0, and k <= q when causal. segment_ids (B, S) or None (one segment)."""
    segment_ids: Optional[jax.Array]
    causal: bool
    kernel: str = "splash"


def self_attention_mask(segment_ids, *, causal: bool, impl: str = "auto"):
    """The `mask` argument of `dot_product_attention` for self-attention over segment_ids (B, S)
    (None: every token is real): a dense (B, S, S) boolean mask (or None) for XLA's dense attention,
    a `SegmentMask` that routes the call to the splash kernel or to the blocked causal attention."""
    seq_len = 0 if segment_ids is None else segment_ids.shape[1]
    kernel = resolve_attention_impl(impl, seq_len=seq_len, causal=causal)
    if kernel != "xla":
        return SegmentMask(segment_ids, causal, kernel)
    if segment_ids is None:
        if not causal:
            return None
        raise ValueError("a causal mask needs segment_ids")
    slots = jnp.arange(segment_ids.shape[1]) if causal else None
    return attention_mask(segment_ids, segment_ids, slots, slots)


def dot_product_attention(q, k, v, mask=None):
    """q (B, S, H, hd); k, v (B, T, KVH, hd) with H a multiple of KVH (GQA); mask (B, S, T), None,
    or a `SegmentMask` (then the splash kernel, see llava_jax/models/splash.py, or
    `blocked_causal_attention` computes it).

    Logits and softmax in float32. Fully masked rows (padding queries) give finite garbage that the
    caller never uses.

    The products run heads-first, (B, KVH, G*S, hd) x (B, KVH, hd, T), with a hand-written
    backward (`_attention_core`): as canonical batched matmuls XLA:CPU neither transposes the
    (S, T) score arrays nor re-derives the softmax gradient through a pass over them, which made
    the autodiff backward of the einsum form ~2x the cost of this one.
    """
    if isinstance(mask, SegmentMask):
        if mask.kernel == "xla_blocked":
            return blocked_causal_attention(q, k, v, mask.segment_ids)
        from llava_jax.models import splash  # Pallas: imported only when the kernel is used

        return splash.splash_attention(q, k, v, mask.segment_ids, causal=mask.causal,
                                       interpret=_platform() != "tpu")
    b, s, h, hd = q.shape
    kvh = k.shape[2]
    rows = None
    if mask is not None:
        rows = _group_rows(mask, h // kvh)
    out = _attention_core(_heads_first(q, kvh), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), rows)
    return _heads_last(out, s)


def blocked_causal_attention(q, k, v, segment_ids=None, *, block: Optional[int] = None):
    """Causal self-attention that skips the fully masked blocks: q (B, S, H, hd); k, v (B, S, KVH, hd);
    segment_ids (B, S) int (0 = padding; None = one segment) -> (B, S, H, hd).

    Query block i (`block` tokens, default QUERY_BLOCK; the last one may be shorter) attends to the
    key prefix [0, end of block i) with the dense path's mask and products: a static Python loop, so
    each block is its own pair of matmuls with static shapes. The keys a prefix leaves out are
    exactly those the causal mask removes, whose probabilities are exactly 0 in the dense softmax:
    values and gradients equal `dot_product_attention` with the dense mask up to the order of
    float32 sums (tests/test_blocked_attention.py). The key/value gradients of all blocks add up in
    float32 and round to the input dtype once, as the dense backward's do. Fully masked (padding)
    rows give finite garbage, as there; no real token reads it.
    """
    b, s = q.shape[:2]
    if k.shape[1] != s:
        raise ValueError(f"blocked causal attention is self-attention: {s} queries but {k.shape[1]} keys")
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    return _blocked_core(q, k, v, segment_ids, block or QUERY_BLOCK)


def _query_blocks(s: int, block: int):
    return [(start, min(start + block, s)) for start in range(0, s, block)]


def _block_inputs(q, kt, vh, segment_ids, start, end):
    """Query block [start, end) heads-first, the key/value prefix [0, end) and its (B, 1, G*n, end) mask."""
    kvh = kt.shape[1]
    slots = jnp.arange(end)
    mask = attention_mask(segment_ids[:, start:end], segment_ids[:, :end], slots[start:], slots)
    return (_heads_first(q[:, start:end], kvh), kt[..., :end], vh[:, :, :end],
            _group_rows(mask, q.shape[2] // kvh))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_core(q, k, v, segment_ids, block):
    return _blocked_core_fwd(q, k, v, segment_ids, block)[0]


def _blocked_core_fwd(q, k, v, segment_ids, block):
    kt, vh = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # (B, KVH, hd, S), (B, KVH, S, hd)
    outs, saved = [], []
    for start, end in _query_blocks(q.shape[1], block):
        qh, kt_i, vh_i, rows = _block_inputs(q, kt, vh, segment_ids, start, end)
        probs = _attention_probs(qh, kt_i, rows)
        out = probs_times_values(probs, vh_i)
        outs.append(_heads_last(out, end - start))
        saved.append((probs, out))
    return jnp.concatenate(outs, axis=1), (q, k, v, segment_ids, saved)


def _blocked_core_bwd(block, residuals, d_out):
    q, k, v, segment_ids, saved = residuals
    b, s, _, hd = q.shape
    kvh = k.shape[2]
    kt, vh = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    d_q = []
    d_kt = jnp.zeros((b, kvh, hd, s), jnp.float32)
    d_vt = jnp.zeros((b, kvh, hd, s), jnp.float32)
    for (start, end), (probs, out) in zip(_query_blocks(s, block), saved):
        qh, kt_i, vh_i, rows = _block_inputs(q, kt, vh, segment_ids, start, end)
        d_out_i = _heads_first(d_out[:, start:end], kvh)
        dq_i, dkt_i, dvt_i = _attention_grads(qh, kt_i, vh_i, rows, probs, out, d_out_i)
        d_q.append(_heads_last(dq_i.astype(q.dtype), end - start))
        d_kt = d_kt.at[..., :end].add(dkt_i)
        d_vt = d_vt.at[..., :end].add(dvt_i)
    return (jnp.concatenate(d_q, axis=1), d_kt.transpose(0, 3, 1, 2).astype(k.dtype),
            d_vt.transpose(0, 3, 1, 2).astype(v.dtype), None)


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def _heads_first(q, kvh):
    """(B, S, H, hd) -> (B, KVH, G*S, hd): row g * S + s holds query head kvh_index * G + g at s."""
    b, s, h, hd = q.shape
    return q.reshape(b, s, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, h // kvh * s, hd)


def _heads_last(out, s):
    """(B, KVH, G*S, hd) -> (B, S, H, hd), the inverse of `_heads_first`."""
    b, kvh, gs, hd = out.shape
    g = gs // s
    return out.reshape(b, kvh, g, s, hd).transpose(0, 3, 1, 2, 4).reshape(b, s, kvh * g, hd)


def _group_rows(mask, g):
    """mask (B, S, T) -> (B, 1, G*S, T): row g * S + s of a KV head's queries uses mask[:, s]."""
    b, s, t = mask.shape
    return jnp.broadcast_to(mask[:, None, None], (b, 1, g, s, t)).reshape(b, 1, g * s, t)


def _attention_probs(qh, kt, rows):
    """float32 softmax((qh @ kt) / sqrt(hd)), masked where rows is False: (B, KVH, G*S, T)."""
    logits = jnp.matmul(qh, kt, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(qh.shape[-1]))
    if rows is not None:
        logits = jnp.where(rows, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attention_core(qh, kt, vh, rows):
    return probs_times_values(_attention_probs(qh, kt, rows), vh)


def _attention_core_fwd(qh, kt, vh, rows):
    probs = _attention_probs(qh, kt, rows)
    out = probs_times_values(probs, vh)
    return out, (qh, kt, vh, rows, probs, out)


def probs_times_values(probs, vh):
    """float32 probs (.., S, T) @ vh (.., T, hd) in vh's dtype, accumulated in float32."""
    return jnp.matmul(probs.astype(vh.dtype), vh, preferred_element_type=jnp.float32).astype(vh.dtype)


def _attention_core_bwd(residuals, d_out):
    qh, kt, vh, rows, probs, out = residuals
    d_q, d_kt, d_vt = _attention_grads(qh, kt, vh, rows, probs, out, d_out)
    return (d_q.astype(qh.dtype), d_kt.astype(kt.dtype), d_vt.swapaxes(-1, -2).astype(vh.dtype), None)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _attention_grads(qh, kt, vh, rows, probs, out, d_out):
    """float32 (d_qh, d_kt, d_vt) of `_attention_core` (d_vt is (B, KVH, hd, T), like kt).

    The softmax gradient via delta = rowsum(d_out * out), an (S, hd) pass instead of (S, T), with
    every product a canonical batched matmul (transposed operands are the small (S, hd) ones)."""
    f32 = jnp.float32
    d_vt = jnp.matmul(d_out.swapaxes(-1, -2), probs.astype(d_out.dtype), preferred_element_type=f32)
    d_probs = jnp.matmul(d_out, vh.swapaxes(-1, -2), preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    # The 1/sqrt(hd) of the logits is applied to the (S, hd) results, not to the (S, T) scores.
    d_logits = probs * (d_probs - delta)
    if rows is not None:  # a fully masked row has uniform probs yet no gradient to its logits
        d_logits = jnp.where(rows, d_logits, 0.0)
    d_logits = d_logits.astype(qh.dtype)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    d_q = jnp.matmul(d_logits, kt.swapaxes(-1, -2), preferred_element_type=f32) * scale
    d_kt = jnp.matmul(qh.swapaxes(-1, -2), d_logits, preferred_element_type=f32) * scale
    return d_q, d_kt, d_vt


# ----- stacked layers -------------------------------------------------------------------------

def create_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    """One module whose parameters carry a leading (num_layers,) axis named 'layers'."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r):
        return make_layer(r)

    return create(rngs)


def build(factory: Callable[[nnx.Rngs], object], rngs: nnx.Rngs):
    """factory(rngs) compiled as one program: eager construction would compile every random
    initializer op by op, which dominates start-up time on CPU (seconds for even a tiny model)."""
    return nnx.jit(factory)(rngs)


_UNROLL_SCANS = [False]


@contextlib.contextmanager
def unrolled_layer_scans():
    """Trace layer scans fully unrolled inside this block. For the cost model only
    (llava_jax/cost_model.py): XLA's cost analysis counts a loop body once, so per-layer costs are
    read from unrolled 1- and 2-layer compiles; training keeps the rolled scan (one body compiled)."""
    _UNROLL_SCANS[0] = True
    try:
        yield
    finally:
        _UNROLL_SCANS[0] = False


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, remat_policy: str = "none",
                num_layers: Optional[int] = None):
    """Run `body(layer, carry, x) -> (carry, y)` over stacked layers with jax.lax.scan.

    Each step is wrapped in jax.checkpoint with the named policy. `num_layers` runs only the first
    layers of the stack (the vision tower never computes layers past the deepest feature layer).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)
    if num_layers is not None:
        state = jax.tree.map(lambda a: a[:num_layers], state)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=_UNROLL_SCANS[0])


def resolve_dtype(name) -> jnp.dtype:
    return jnp.dtype(name)


def constrain_act(x, names: Sequence[Optional[str]] = ACT_SHAPE):
    return sharding.constrain(x, names)
