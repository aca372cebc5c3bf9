"""LLaMA decoder (the transformers LlamaForCausalLM computation) with a packing-ready mask and a KV cache.

Attention rule: token q sees token k iff segment[q] == segment[k] != 0 and slot(k) <= slot(q);
the cache layout is described in docs/internals.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llava_jax.models import layers as L
from llava_jax.models import lora as lora_lib
from llava_jax.models.config import TextConfig
from llava_jax.models.layout import TRAINING, DecoderLayout


def default_segment_ids(input_ids, attention_mask=None, segment_ids=None):
    """segment_ids if given, else the attention mask (1 real / 0 pad), else all ones."""
    if segment_ids is not None:
        return jnp.asarray(segment_ids, jnp.int32)
    if attention_mask is not None:
        return (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
    return jnp.ones(jnp.shape(input_ids), jnp.int32)


def default_positions(segment_ids):
    """cumsum(segment != 0) - 1, clipped at 0: a left-padded row gets the unpadded row's positions."""
    return jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1) - 1, 0).astype(jnp.int32)


class LayerCache(NamedTuple):
    """One layer's KV cache: k, v (B * KVH, T, hd), row b * KVH + h (the stacked model's cache is
    one LayerCache of (L, B * KVH, T, hd) arrays, which the layer scan slices into these).

    Heads before slots, so the attention matmuls read the cache as it lies (one leading batch dim)
    instead of transposing it on every step, and each layer's buffer is its own array that a
    donated jit argument updates in place. Batch and heads share one axis because with a size-1
    axis (one row) XLA reshapes the updated cache for the matmul, duplicates the update on both
    sides of the reshape and then copies the whole cache to keep each update in place."""
    k: jax.Array
    v: jax.Array


def extend_cache(cache: dict, max_length: int) -> dict:
    """The cache with room for `max_length` slots: empty slots (segment 0) appended to every buffer
    (stacked or per-layer; slots are the second-to-last axis of keys and values)."""
    extra = max_length - cache["segment"].shape[1]
    if extra < 0:
        raise ValueError(f"cannot shrink a {cache['segment'].shape[1]}-slot cache to {max_length} slots")

    def grow(x):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])

    return dict(cache, layers=jax.tree.map(grow, cache["layers"]),
                segment=jnp.pad(cache["segment"], ((0, 0), (0, extra))))


def cached_attention(q, k, v, mask):
    """q (B, S, H, hd); k, v (B * KVH, T, hd) (the LayerCache layout); mask (B, S, T) -> (B, S, H, hd).

    The computation of `layers.dot_product_attention` (float32 logits and softmax, GQA groups) for
    the heads-major cache layout."""
    b, s, h, hd = q.shape
    t = k.shape[1]
    kvh = k.shape[0] // b
    g = h // kvh
    q = q.reshape(b, s, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b * kvh, g * s, hd)
    logits = jnp.einsum("nqd,ntd->nqt", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(hd))
    mask = jnp.broadcast_to(mask[:, None, None], (b, kvh, g, s, t)).reshape(b * kvh, g * s, t)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    out = L.probs_times_values(jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(b, kvh, g, s, hd).transpose(0, 3, 1, 2, 4).reshape(b, s, h, hd)


def _heads_major(x):
    """(B, S, KVH, hd) -> (B * KVH, S, hd), the LayerCache row order."""
    b, s, kvh, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * kvh, s, hd)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, lora=None, layout: DecoderLayout = TRAINING):
        d, hd = cfg.hidden_size, cfg.head_dim
        # lora: a LoraConfig makes them LoraDense layers; layout.weights: how plain kernels are held
        kw = dict(lora=lora, weights=layout.weights, dtype=dtype, rngs=rngs)
        if layout.fused:  # one (D, (H + 2 KVH) hd) projection, q, k, v columns in that order
            self.qkv_proj = L.dense(d, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, axes=("embed", "heads"),
                                    weights=layout.weights, dtype=dtype, rngs=rngs)
        else:
            self.q_proj = lora_lib.linear("q", d, cfg.num_heads * hd, axes=("embed", "heads"), **kw)
            self.k_proj = lora_lib.linear("k", d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
            self.v_proj = lora_lib.linear("v", d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = lora_lib.linear("o", cfg.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.fused = layout.fused
        self.config = cfg

    def _project(self, x):
        """q, k, v (B, S, *, hd), from one `qkv_proj` in a fused layout."""
        cfg = self.config
        b, s, _ = x.shape
        if not self.fused:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), [q_width, q_width + kv_width], axis=-1)
        return (q.reshape(b, s, cfg.num_heads, cfg.head_dim), k.reshape(b, s, cfg.num_kv_heads, cfg.head_dim),
                v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim))

    def __call__(self, x, positions, mask, kv: Optional[LayerCache] = None, index=None):
        """x (B, S, D). kv: this layer's `LayerCache`; the new keys/values are written at slots
        [index, index + S) and the updated cache is returned with the output."""
        cfg = self.config
        b, s, _ = x.shape
        inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q, k, v = self._project(x)
        q = L.constrain_act(L.apply_rope(q, positions, inv_freq), ("act_batch", "act_seq", "act_heads", None))
        k = L.constrain_act(L.apply_rope(k, positions, inv_freq), ("act_batch", "act_seq", "act_kv_heads", None))
        v = L.constrain_act(v, ("act_batch", "act_seq", "act_kv_heads", None))
        q, k, v = (checkpoint_name(a, name) for a, name in zip((q, k, v), L.QKV_NAMES))  # remat policies
        if kv is None:
            out = L.dot_product_attention(q, k, v, mask)
            return self.o_proj(out.reshape(b, s, -1)), None
        k = jax.lax.dynamic_update_slice(kv.k, _heads_major(k).astype(kv.k.dtype), (0, index, 0))
        v = jax.lax.dynamic_update_slice(kv.v, _heads_major(v).astype(kv.v.dtype), (0, index, 0))
        out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out.reshape(b, s, -1)), LayerCache(k, v)


class FusedGatedMLP(nnx.Module):
    """The SwiGLU of `layers.GatedMLP` with gate and up as one (in, 2 * hidden) matmul (a fused
    layout's MLP, `layout.DecoderLayout`): one product over the concatenated kernel reads the input
    once and pays one call instead of two."""

    def __init__(self, features: int, hidden: int, *, weights: str = "float32", dtype, rngs: nnx.Rngs):
        kw = dict(weights=weights, dtype=dtype, rngs=rngs)
        self.gate_up_proj = L.dense(features, 2 * hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = L.dense(hidden, features, axes=("mlp", "embed"), **kw)
        self.hidden = hidden

    def __call__(self, x):
        gate, up = jnp.split(self.gate_up_proj(x), [self.hidden], axis=-1)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs, lora=None, layout: DecoderLayout = TRAINING):
        self.input_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs, lora=lora, layout=layout)
        self.post_attention_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        if layout.fused:
            self.mlp = FusedGatedMLP(d, f, weights=layout.weights, dtype=dtype, rngs=rngs)
        elif lora is not None:
            self.mlp = lora_lib.LoraGatedMLP(d, f, lora=lora, dtype=dtype, rngs=rngs)
        else:
            self.mlp = L.GatedMLP(d, f, weights=layout.weights, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        x = L.constrain_act(x)
        h, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return L.constrain_act(x), kv


class LlamaModel(nnx.Module):
    """Embeddings, decoder layers, final norm and LM head (absent when tied, unless light weights).

    lora: a `lora.LoraConfig` builds the decoder projections as LoRA layers over a frozen base.
    layout: how the decoder is built (`layout.DecoderLayout`): stacked and scanned (training, the
    default), or per-layer modules, fused projections and light kernels for generation."""

    def __init__(self, cfg: TextConfig, *, dtype="float32", remat_policy: str = "none", rngs: nnx.Rngs,
                 lora=None, attention_impl: str = "auto", layout: DecoderLayout = TRAINING):
        if lora is not None and (layout.fused or layout.weights != "float32"):
            raise ValueError(f"LoRA layers are built unfused over their own base kernels, not in {layout}; "
                             f"merge the adapters first (`lora.merged_params`)")
        dtype = L.resolve_dtype(dtype)
        self.config = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.attention_impl = attention_impl  # layers.ATTENTION_IMPLS; the KV-cache path is always XLA's
        self.lora = lora
        self.layout = layout
        self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

        def layer(r):
            return DecoderLayer(cfg, dtype=dtype, rngs=r, lora=lora, layout=layout)

        self.layers = (L.create_stacked(layer, cfg.num_layers, rngs) if layout.stacked
                       else nnx.List([layer(rngs) for _ in range(cfg.num_layers)]))
        self.norm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        # tied: the table projects, unless the kernels are light (then a converted copy, `layout`)
        self.lm_head = None if cfg.tie_word_embeddings and layout.weights == "float32" else L.dense(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), weights=layout.weights, dtype=dtype, rngs=rngs)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def decode(self, x, segment_ids, positions, cache: Optional[dict] = None):
        """Run the decoder over embeddings x (B, S, D) -> (final-normed hidden, new cache or None)."""
        s = x.shape[1]
        x = L.constrain_act(x.astype(self.dtype))
        if cache is None:
            mask = L.self_attention_mask(segment_ids, causal=True, impl=self.attention_impl)
            if not self.layout.stacked:
                h = x
                for layer in self.layers:
                    h = layer(h, positions, mask)[0]
                return self.norm(h), None

            def body(layer, h, _):
                return layer(h, positions, mask)[0], None

            h, _ = L.scan_layers(self.layers, body, x, remat_policy=self.remat_policy)
            return self.norm(h), None

        index = cache["index"]
        kv_segment = jax.lax.dynamic_update_slice(cache["segment"], segment_ids.astype(jnp.int32), (0, index))
        mask = L.attention_mask(segment_ids, kv_segment, index + jnp.arange(s), jnp.arange(kv_segment.shape[1]))

        if not self.layout.stacked:
            # One buffer per layer, each written only at the new slots: with the cache donated to
            # the jitted caller, a decode step touches S slots per layer instead of the whole cache.
            h, layer_caches = x, []
            for layer, kv in zip(self.layers, cache["layers"]):
                h, kv = layer(h, positions, mask, kv, index)
                layer_caches.append(kv)
            layer_caches = tuple(layer_caches)
        else:
            def body(layer, h, kv):
                return layer(h, positions, mask, kv, index)

            h, layer_caches = L.scan_layers(self.layers, body, x, cache["layers"], remat_policy=self.remat_policy)
        return self.norm(h), dict(layers=layer_caches, segment=kv_segment, index=index + s)

    def logits(self, h):
        """float32 logits from final-normed hidden states."""
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return L.constrain_act(out.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """Empty cache (layout in docs/internals.md): `layers` holds the keys and values in the
        `LayerCache` layout (B * KVH, T, hd): one `LayerCache` per layer in an unstacked layout,
        else one `LayerCache` of (L, B * KVH, T, hd) arrays that the layer scan slices."""
        cfg = self.config
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        shape = (batch_size * cfg.num_kv_heads, max_length, cfg.head_dim)
        if not self.layout.stacked:
            layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                           for _ in range(cfg.num_layers))
        else:
            stacked = (cfg.num_layers,) + shape
            layers = LayerCache(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
        return dict(layers=layers, segment=jnp.zeros((batch_size, max_length), jnp.int32),
                    index=jnp.zeros((), jnp.int32))

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None, cache=None):
        """logits (B, S, V) float32; with `cache`, (logits, new_cache) and positions are required."""
        segment_ids = default_segment_ids(input_ids, attention_mask, segment_ids)
        if positions is None:
            if cache is not None:
                raise ValueError("positions must be passed explicitly when a KV cache is used")
            positions = default_positions(segment_ids)
        h, new_cache = self.decode(self.embed(input_ids), segment_ids, positions, cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)
