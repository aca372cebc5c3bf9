"""LLaMA decoder (the transformers LlamaForCausalLM computation) with a packing-ready mask and a KV cache.

Attention rule: token q sees token k iff segment[q] == segment[k] != 0 and slot(k) <= slot(q);
the cache layout is described in docs/internals.md.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import layers as L
from llava_jax.models.config import TextConfig


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


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, rngs=rngs)
        self.q_proj = L.Dense(d, cfg.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = L.Dense(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = L.Dense(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = L.Dense(cfg.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.config = cfg

    def __call__(self, x, positions, mask, kv=None, index=None):
        """x (B, S, D). kv: this layer's cached (k, v) (B, T, KVH, hd); the new keys/values are
        written at slots [index, index + S) and the updated pair is returned."""
        cfg = self.config
        b, s, _ = x.shape
        inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
        q = L.constrain_act(L.apply_rope(q, positions, inv_freq), ("act_batch", "act_seq", "act_heads", None))
        k = L.constrain_act(L.apply_rope(k, positions, inv_freq), ("act_batch", "act_seq", "act_kv_heads", None))
        v = L.constrain_act(v, ("act_batch", "act_seq", "act_kv_heads", None))
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
        out = L.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out.reshape(b, s, -1)), kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = L.GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        x = L.constrain_act(x)
        h, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return L.constrain_act(x), kv


class LlamaModel(nnx.Module):
    """Embeddings, stacked decoder layers, final norm and LM head (absent when tied)."""

    def __init__(self, cfg: TextConfig, *, dtype="float32", remat_policy: str = "none", rngs: nnx.Rngs):
        dtype = L.resolve_dtype(dtype)
        self.config = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = L.create_stacked(lambda r: DecoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.norm = L.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else L.Dense(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def decode(self, x, segment_ids, positions, cache: Optional[dict] = None):
        """Run the decoder over embeddings x (B, S, D) -> (final-normed hidden, new cache or None)."""
        s = x.shape[1]
        x = L.constrain_act(x.astype(self.dtype))
        if cache is None:
            slots = jnp.arange(s)
            mask = L.attention_mask(segment_ids, segment_ids, slots, slots)

            def body(layer, h, _):
                return layer(h, positions, mask)[0], None

            h, _ = L.scan_layers(self.layers, body, x, remat_policy=self.remat_policy)
            return self.norm(h), None

        index = cache["index"]
        kv_segment = jax.lax.dynamic_update_slice(cache["segment"], segment_ids.astype(jnp.int32), (0, index))
        mask = L.attention_mask(segment_ids, kv_segment, index + jnp.arange(s), jnp.arange(kv_segment.shape[1]))

        def body(layer, h, kv):
            return layer(h, positions, mask, kv, index)

        h, (k, v) = L.scan_layers(self.layers, body, x, (cache["k"], cache["v"]), remat_policy=self.remat_policy)
        return self.norm(h), dict(k=k, v=v, segment=kv_segment, index=index + s)

    def logits(self, h):
        """float32 logits from final-normed hidden states."""
        out = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return L.constrain_act(out.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        cfg = self.config
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    segment=jnp.zeros((batch_size, max_length), jnp.int32), index=jnp.zeros((), jnp.int32))

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
