"""CLIP ViT vision tower (the transformers CLIPVisionModel computation, channels-last input)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import layers as L
from llava_jax.models.config import VisionConfig


class CLIPOutput(NamedTuple):
    last_hidden_state: jax.Array          # output of the last encoder layer (no post-LN), (N, T, D)
    pooler_output: jax.Array              # post_layernorm(CLS token), (N, D)
    hidden_states: Optional[tuple]        # embeddings after pre-LN, then every layer's output


class PatchEmbedding(nnx.Module):
    """Non-overlapping P x P patches times an HWIO kernel: the bias-free stride-P conv of CLIP."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.kernel = L.param(rngs, L.normal_init(), (p, p, cfg.num_channels, cfg.hidden_size),
                              ("patch", "patch", None, "embed"))
        self.patch_size = p
        self.dtype = dtype

    def __call__(self, pixels):
        n, h, w, c = pixels.shape
        p = self.patch_size
        x = pixels.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, (h // p) * (w // p), p * p * c).astype(self.dtype)
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        return L.matmul(x, kernel)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.patch_embedding = PatchEmbedding(cfg, dtype=dtype, rngs=rngs)
        self.class_embedding = L.param(rngs, L.normal_init(), (cfg.hidden_size,), ("embed",))
        self.position_embedding = L.Embed(cfg.num_positions, cfg.hidden_size, axes=("positions", "embed"),
                                          dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixels):
        patches = self.patch_embedding(pixels)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (patches.shape[0], 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, rngs=rngs)
        self.q_proj = L.Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = L.Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = L.Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = L.Dense(d, d, axes=("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.attention_impl = attention_impl

    def __call__(self, x):
        n, t, _ = x.shape
        split = lambda y: y.reshape(n, t, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = L.dot_product_attention(q, k, v, L.self_attention_mask(None, causal=False, impl=self.attention_impl))
        return self.out_proj(out.reshape(n, t, -1))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, attention_impl: str = "auto", rngs: nnx.Rngs):
        self.layer_norm1 = L.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = VisionAttention(cfg, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.layer_norm2 = L.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = L.FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = L.constrain_act(x)
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return L.constrain_act(x)


class CLIPVisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype="float32", remat_policy: str = "none",
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        dtype = L.resolve_dtype(dtype)
        self.config = cfg
        self.remat_policy = remat_policy
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = L.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.layers = L.create_stacked(lambda r: EncoderLayer(cfg, dtype=dtype, attention_impl=attention_impl, rngs=r),
                                       cfg.num_layers, rngs)
        self.post_layernorm = L.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def embed(self, pixel_values):
        """hidden_states[0]: patch + class + position embeddings after pre_layrnorm."""
        return self.pre_layrnorm(self.embeddings(pixel_values))

    def _encode(self, x, num_layers: int, collect: bool):
        def body(layer, h, _):
            h = layer(h)
            return h, (h if collect else None)

        return L.scan_layers(self.layers, body, x, remat_policy=self.remat_policy, num_layers=num_layers)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPOutput:
        x = self.embed(pixel_values)
        last, per_layer = self._encode(x, self.config.num_layers, output_hidden_states)
        hidden = None
        if output_hidden_states:
            hidden = (x,) + tuple(per_layer[i] for i in range(self.config.num_layers))
        return CLIPOutput(last, self.post_layernorm(last[:, 0]), hidden)

    def select_hidden_states(self, pixel_values, indices: Sequence[int]) -> tuple:
        """hidden_states[i] for each i (negative counts from the end, as in Python), computing only
        the layers up to the deepest one requested."""
        total = self.config.num_layers + 1
        resolved = []
        for i in indices:
            if not -total <= i < total:
                raise ValueError(f"vision feature layer {i} out of range for a {self.config.num_layers}-layer "
                                 f"tower ({total} hidden states)")
            resolved.append(i % total)
        deepest = max(resolved)
        x = self.embed(pixel_values)
        if deepest == 0:
            return tuple(x for _ in resolved)
        need_stack = any(0 < i < deepest for i in resolved)
        last, per_layer = self._encode(x, deepest, need_stack)
        pick = lambda i: x if i == 0 else (last if i == deepest else per_layer[i - 1])
        return tuple(pick(i) for i in resolved)
