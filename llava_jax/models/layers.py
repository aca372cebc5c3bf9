"""Building blocks shared by the CLIP tower, the projector and the LLaMA decoder.

Parameters are float32 and carry logical axis names (`out_sharding=`) that llava_jax.sharding maps
onto the mesh; every module computes in the `dtype` it was built with.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import sharding

Axes = tuple  # logical axis names, one per array dimension

ACT_SHAPE = ("act_batch", "act_seq", "act_embed")

# Name -> jax.checkpoint policy; 'none' means layers are not rematerialised at all.
REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def normal_init(std: float = 0.02):
    return jax.nn.initializers.normal(std)


def param(rngs: nnx.Rngs, init, shape, axes: Axes) -> nnx.Param:
    """A float32 parameter with its logical axis names attached as metadata."""
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=tuple(axes))


# ----- dense layers, embeddings, norms -------------------------------------------------------

class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored (in, out)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, normal_init(), (in_features, out_features), axes)
        self.bias = param(rngs, jax.nn.initializers.zeros, (out_features,), axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        # The product runs over (rows, in) with every leading axis folded into rows: for (B, S, in)
        # inputs the weight gradient contracts two axes, and XLA:CPU first copies the activations
        # into a transposed layout (BENCHMARKS.md §1).
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.dot(rows, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_int8(kernel):
    """(..., in, out) float -> (int8 kernel, float32 scale (..., out)): symmetric per output channel,
    max-abs / 127 (LoRA's int8 base and the int8 inference weights)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=-2) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(kernel / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


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
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


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

    def __init__(self, features: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate_proj = Dense(features, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Dense(features, hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Dense(hidden, features, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

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


# model config `attention_impl`: 'auto' is the splash kernel on TPU and XLA's dense attention
# elsewhere; 'xla' / 'splash' force one (splash off TPU runs the kernel in interpret mode: tests).
ATTENTION_IMPLS = ("auto", "xla", "splash")


def _platform() -> str:
    """The platform the computation is being built for: the active mesh's devices (an AOT compile
    for a TPU topology traces on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def resolve_attention_impl(impl: str) -> str:
    """'auto' | 'xla' | 'splash' -> 'xla' or 'splash' for the platform being traced for."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; expected one of {list(ATTENTION_IMPLS)}")
    if impl == "auto":
        return "splash" if _platform() == "tpu" else "xla"
    return impl


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """The self-attention mask as data for a kernel that applies it block by block (splash):
    token q sees k iff segment[q] == segment[k] != 0, and k <= q when causal. segment_ids (B, S)
    or None (one segment)."""
    segment_ids: Optional[jax.Array]
    causal: bool


def self_attention_mask(segment_ids, *, causal: bool, impl: str = "auto"):
    """The `mask` argument of `dot_product_attention` for self-attention over segment_ids (B, S)
    (None: every token is real): a dense (B, S, S) boolean mask (or None) for XLA's attention, a
    `SegmentMask` that routes the call to the splash kernel."""
    if resolve_attention_impl(impl) == "splash":
        return SegmentMask(segment_ids, causal)
    if segment_ids is None:
        if not causal:
            return None
        raise ValueError("a causal mask needs segment_ids")
    slots = jnp.arange(segment_ids.shape[1]) if causal else None
    return attention_mask(segment_ids, segment_ids, slots, slots)


def dot_product_attention(q, k, v, mask=None):
    """q (B, S, H, hd); k, v (B, T, KVH, hd) with H a multiple of KVH (GQA); mask (B, S, T), None,
    or a `SegmentMask` (then the splash kernel computes it, see llava_jax/models/splash.py).

    Logits and softmax in float32. Fully masked rows (padding queries) give finite garbage that the
    caller never uses.

    The products run heads-first, (B, KVH, G*S, hd) x (B, KVH, hd, T), with a hand-written
    backward (`_attention_core`): as canonical batched matmuls XLA:CPU neither transposes the
    (S, T) score arrays nor re-derives the softmax gradient through a pass over them, which made
    the autodiff backward of the einsum form ~2x the cost of this one.
    """
    if isinstance(mask, SegmentMask):
        from llava_jax.models import splash  # Pallas: imported only when the kernel is used

        return splash.splash_attention(q, k, v, mask.segment_ids, causal=mask.causal,
                                       interpret=_platform() != "tpu")
    b, s, h, hd = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qh = q.reshape(b, s, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, hd)
    kt = k.transpose(0, 2, 3, 1)  # (B, KVH, hd, T)
    vh = v.transpose(0, 2, 1, 3)  # (B, KVH, T, hd)
    rows = None
    if mask is not None:  # row g * S + s of a KV head's queries uses mask[:, s]
        rows = jnp.broadcast_to(mask[:, None, None], (b, 1, g, s, t)).reshape(b, 1, g * s, t)
    out = _attention_core(qh, kt, vh, rows)
    return out.reshape(b, kvh, g, s, hd).transpose(0, 3, 1, 2, 4).reshape(b, s, h, hd)


def _attention_probs(qh, kt, rows):
    """float32 softmax((qh @ kt) / sqrt(hd)), masked where rows is False: (B, KVH, G*S, T)."""
    logits = jnp.matmul(qh, kt, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(qh.shape[-1]))
    if rows is not None:
        logits = jnp.where(rows, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attention_core(qh, kt, vh, rows):
    return jnp.matmul(_attention_probs(qh, kt, rows).astype(vh.dtype), vh)


def _attention_core_fwd(qh, kt, vh, rows):
    probs = _attention_probs(qh, kt, rows)
    out = jnp.matmul(probs.astype(vh.dtype), vh)
    return out, (qh, kt, vh, rows, probs, out)


def _attention_core_bwd(residuals, d_out):
    """The softmax gradient via delta = rowsum(d_out * out), an (S, hd) pass instead of (S, T), with
    every product a canonical batched matmul (transposed operands are the small (S, hd) ones)."""
    qh, kt, vh, rows, probs, out = residuals
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
    return (d_q.astype(qh.dtype), d_kt.astype(kt.dtype), d_vt.swapaxes(-1, -2).astype(vh.dtype), None)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


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
