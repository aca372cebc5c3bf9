"""Lighter language-model weights for generation: bfloat16 or int8 copies of the matmul kernels.

A decode step reads every decoder and vocabulary-projection kernel once, so its time follows the
bytes of those kernels. `convert_language_weights(model, 'bfloat16' | 'int8')` replaces, in place,
each `Dense` of the decoder layers (plain or fused by `LlamaModel.fuse_projections`) and the
vocabulary projection by
- `Bf16Dense`: the kernel stored in bfloat16; bfloat16 x bfloat16 products accumulated in float32;
- `Int8Dense`: the kernel stored in int8 with one float32 scale per output channel (symmetric,
  max |w| / 127), the input quantized per row to int8 on the fly (max |x| / 127), an int8 x int8
  -> int32 matmul, then both scales applied. XLA's CPU backend runs that matmul on the VNNI int8
  units; a weight-only int8 kernel (int8 converted to bf16/f32 before the matmul) measured no
  faster than float32 on the benchmark CPU, because the conversion is not fused into the matmul.
Norms, embeddings lookups, attention, the KV cache, the vision tower and the projector keep their
dtypes. The vocabulary projection of a model with tied embeddings gets its own converted
(transposed) copy; the lookup table stays as it is.

Both kinds compute a single-row matmul as a two-row one: XLA's CPU backend sends a 1-row product
with non-float32 operands to a slow matrix-vector routine (tens of times slower than the 2-row
product on the benchmark CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import layers as L

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


def _axes(variable) -> tuple:
    return tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.ndim)


class Bf16Dense(nnx.Module):
    """A bias-free Dense whose kernel is stored in bfloat16 (float32 accumulation)."""

    def __init__(self, kernel, axes, dtype):
        self.kernel = nnx.Param(kernel.astype(jnp.bfloat16), out_sharding=tuple(axes))
        self.dtype = dtype

    def __call__(self, x):
        return _rows_matmul(x.astype(jnp.bfloat16), self.kernel[...], jnp.float32).astype(self.dtype)


class Int8Dense(nnx.Module):
    """A bias-free Dense with an int8 kernel (per-output-channel scales) and per-row int8 inputs."""

    def __init__(self, kernel, axes, dtype):
        kernel, scale = L.quantize_int8(kernel)
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


_CONVERTERS = {"bfloat16": Bf16Dense, "int8": Int8Dense}


def _convert_dense(dense: L.Dense, convert):
    if dense.bias is not None:
        raise ValueError("only bias-free Dense layers (the LLaMA ones) are converted")
    return convert(dense.kernel[...], _axes(dense.kernel), dense.dtype)


def convert_language_weights(model, weights_dtype: str):
    """Convert the decoder and vocabulary-projection kernels of an unstacked `LlavaModel` in place.

    'float32' leaves the model as it is. The decoder must be unstacked first
    (`model.unstack_layers()`): the converted kernels are per layer."""
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights dtype {weights_dtype!r}; expected one of {WEIGHT_DTYPES}")
    if weights_dtype == "float32":
        return model
    lm = model.language_model
    if not lm.layers_unstacked:
        raise ValueError("convert_language_weights needs unstacked decoder layers (call model.unstack_layers())")
    convert = _CONVERTERS[weights_dtype]
    for layer in lm.layers:
        # the plain projections, or their fused forms (`LlamaModel.fuse_projections`)
        for module, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "gate_up_proj", "down_proj"))):
            for name in names:
                dense = getattr(module, name, None)
                if dense is not None:
                    setattr(module, name, _convert_dense(dense, convert))
    if lm.lm_head is None:  # tied: a transposed copy for the projection, the table for lookups
        table = lm.embed_tokens.embedding
        axes = _axes(table)
        lm.lm_head = nnx.data(convert(table[...].T, (axes[1], axes[0]), lm.dtype))
    else:
        lm.lm_head = _convert_dense(lm.lm_head, convert)
    return model


def weight_bytes(model) -> int:
    """Bytes of the arrays a decode step reads: decoder layers, final norm, vocabulary projection
    (the token embedding is a one-row lookup, not counted unless it is the projection)."""
    lm = model.language_model
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm)))
    embed = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm.embed_tokens)))
    return total - (embed if lm.lm_head is not None else 0)
