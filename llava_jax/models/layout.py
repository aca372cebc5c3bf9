"""The decoder's layout, chosen when a model is built, and pure functions between layouts' parameters.

`DecoderLayout(stacked, fused, weights)`, given to `LlavaModel` / `LlamaModel` (`layout=`):
- stacked (training, as checkpoints hold it): the decoder layers are one module whose parameters
  carry a leading L axis, run by a scan (one layer body compiles once). Unstacked (inference): an
  `nnx.List` of per-layer modules run in a Python loop (unrolled in the compiled program), and
  `init_cache` makes one `LayerCache` per layer. XLA on CPU copies a layer's weights out of a
  stacked array before every matmul (a slice feeding a dot is materialised), which doubles the
  memory traffic of a decode step; per-layer arrays, and per-layer KV-cache buffers that a donated
  decode step updates in place, are read where they lie.
- fused: per layer q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` (`llama.FusedGatedMLP`),
  kernels concatenated along the output axis: one matmul and one read of the input instead of three
  or two (4-7% of a batch-8 decode step on the benchmark CPU). The fused output axis mixes q, k and
  v columns, so a tensor-parallel mesh would split it across their boundaries: the generator fuses
  only unsharded models.
- weights: the decoder and vocabulary-projection kernels as trained (float32), or bfloat16 /
  int8 (`layers.Bf16Dense` / `layers.Int8Dense`). A decode step reads every one of those kernels
  once, so its time follows their bytes. A tied model gets its own converted (transposed)
  projection `lm_head`; the embedding table stays as it is for lookups. Norms, embeddings,
  attention, the KV cache, the vision tower and the projector keep their dtypes.

`convert_params(params, text_config, source, target)` turns a `LlavaModel`'s parameter dict
(`nnx.to_pure_dict(nnx.state(model))`) from one layout into another without touching a module:
stacked <-> unstacked and fused <-> unfused both ways; float32 kernels to bfloat16 / int8 one way.
`llava.with_layout(model, layout)` builds the model in the new layout and fills it with them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """Hashable (a static part of the graphdef)."""

    stacked: bool = True          # layers on a leading axis, scanned (training); else one module per layer
    fused: bool = False           # q/k/v and gate/up as single projections (unsharded decoding)
    weights: str = "float32"      # decoder and vocabulary-projection kernels: layers.WEIGHT_DTYPES

    def __post_init__(self):
        if self.weights not in L.WEIGHT_DTYPES:
            raise ValueError(f"unknown weights dtype {self.weights!r}; expected one of {L.WEIGHT_DTYPES}")


TRAINING = DecoderLayout()

# fused projection -> (its parent in a decoder layer, the projections it concatenates, in order)
FUSED = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
         "gate_up_proj": ("mlp", ("gate_proj", "up_proj"))}
_PROJECTION_PARENTS = ("self_attn", "mlp")


def _widths(text_config, fused: str) -> tuple:
    t = text_config
    kv = t.num_kv_heads * t.head_dim
    return (t.num_heads * t.head_dim, kv, kv) if fused == "qkv_proj" else (t.intermediate_size,) * 2


def _check_plain(module: dict, where: str) -> None:
    extra = sorted(set(module) - {"kernel", "scale"})
    if extra:
        raise ValueError(f"{where} holds {extra}: only bias-free, adapter-free projections (the plain LLaMA "
                         f"ones; merge LoRA adapters first, `lora.merged_params`) change layout")


def fuse_layer(layer: dict) -> dict:
    """A decoder layer's parameters (one layer's, or the stacked layers') with q/k/v and gate/up
    concatenated along their output axis (kernels, and int8 scales, alike)."""
    out = dict(layer)
    for fused, (parent, parts) in FUSED.items():
        module = dict(out[parent])
        pieces = [module.pop(p) for p in parts]
        for p, piece in zip(parts, pieces):
            _check_plain(piece, f"{parent}.{p}")
        module[fused] = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *pieces)
        out[parent] = module
    return out


def unfuse_layer(layer: dict, text_config) -> dict:
    """`fuse_layer` undone: the fused projections split back at the q/k/v and gate/up widths."""
    out = dict(layer)
    for fused, (parent, parts) in FUSED.items():
        module = dict(out[parent])
        whole = module.pop(fused)
        cuts = np.cumsum(_widths(text_config, fused))[:-1]
        split = {name: jnp.split(x, cuts, axis=-1) for name, x in whole.items()}
        module.update({p: {name: pieces[i] for name, pieces in split.items()} for i, p in enumerate(parts)})
        out[parent] = module
    return out


def light_kernel(kernel, weights: str) -> dict:
    """The parameters of a `layers.dense(..., weights=weights)` holding float `kernel` (in, out)."""
    if weights == "float32":
        return {"kernel": kernel}
    if weights == "bfloat16":
        return {"kernel": jnp.asarray(kernel).astype(jnp.bfloat16)}
    q, scale = L.quantize_int8(kernel)
    return {"kernel": q, "scale": scale}


def light_layer(layer: dict, weights: str) -> dict:
    """Every projection kernel of a decoder layer's parameters (float) as `weights`."""
    out = dict(layer)
    for parent in _PROJECTION_PARENTS:
        converted = {}
        for name, module in out[parent].items():
            _check_plain(module, f"{parent}.{name}")
            converted[name] = light_kernel(module["kernel"], weights)
        out[parent] = converted
    return out


def _convert_layer(layer: dict, text_config, source: DecoderLayout, target: DecoderLayout) -> dict:
    if source.fused and not target.fused:
        layer = unfuse_layer(layer, text_config)
    elif target.fused and not source.fused:
        layer = fuse_layer(layer)
    if target.weights != source.weights:
        layer = light_layer(layer, target.weights)
    return layer


def convert_params(params: dict, text_config, source: DecoderLayout, target: DecoderLayout) -> dict:
    """A `LlavaModel`'s parameter dict (nested, as `nnx.to_pure_dict`) in layout `source` -> the same
    parameters in layout `target` (a new dict; arrays no layout change touches are shared).

    Layers are converted one at a time, so besides the input only one layer's intermediates are
    alive at once. Light kernels (bfloat16, int8) are made from float kernels only."""
    if target.weights != source.weights and source.weights != "float32":
        raise ValueError(f"cannot convert {source.weights} kernels to {target.weights}: light weights are "
                         f"made from the float32 ones (rebuild from the training layout's parameters)")
    lm = dict(params["language_model"])
    layers = lm["layers"]
    if source.stacked and target.stacked:
        layers = _convert_layer(layers, text_config, source, target)
    else:
        n = text_config.num_layers
        slices = (jax.tree.map(lambda a, i=i: a[i], layers) if source.stacked else layers[i] for i in range(n))
        converted = [_convert_layer(layer, text_config, source, target) for layer in slices]
        layers = (jax.tree.map(lambda *xs: jnp.stack(xs), *converted) if target.stacked
                  else dict(enumerate(converted)))
    lm["layers"] = layers
    if target.weights != source.weights:  # tied: a transposed copy of the table projects
        head = lm["lm_head"]["kernel"] if "lm_head" in lm else jnp.asarray(lm["embed_tokens"]["embedding"]).T
        lm["lm_head"] = light_kernel(head, target.weights)
    return dict(params, language_model=lm)


def weight_bytes(model) -> int:
    """Bytes of the arrays a decode step of `model` (a LlavaModel) reads: decoder layers, final
    norm, vocabulary projection (the token embedding is a one-row lookup, not counted unless it is
    the projection)."""
    lm = model.language_model
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm)))
    embed = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm.embed_tokens)))
    return total - (embed if lm.lm_head is not None else 0)
