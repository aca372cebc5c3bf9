"""The key mapping between HF weight files and our parameter tree: the one table, and the renamings.

Canonical names are the transformers-5 save format of LlavaForConditionalGeneration
(`language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.*`,
`vision_tower.*`; see docs/internals.md). Each `Entry` maps one of our parameters to its HF key(s)
and converts tensors in both directions, one tensor at a time, so converters can stream shards:

- 'linear': PyTorch (out, in) <-> our (in, out)
- 'conv':   PyTorch OIHW <-> our HWIO
- stacked layer parameters: one HF key per layer <-> our leading L axis.

`canonical_key` renames every other layout the reference produced to those canonical names:

- older llava-hf files: `vision_tower.vision_model.*`
- in-memory transformers names: `model.language_model.*`, `model.vision_tower.*`,
  `model.multi_modal_projector.*`, `lm_head.weight`
- a CLIP repo: `vision_model.*` (CLIPModel, CLIPVisionModelWithProjection: the text model and the
  contrastive heads are ignored), or bare `embeddings.*`, `encoder.layers.*`, `pre_layrnorm.*`,
  `post_layernorm.*` (CLIPVisionModel saved by transformers 5)
- a LLaMA/Vicuna repo: `model.*`, `lm_head.weight`
- original LLaVA projectors: `model.mm_projector.{0,2,...}.*` or `mm_projector.{0,2,...}.*`
  (Sequential of Linear/GELU: Linear k sits at index 2(k-1)) and `mm_projector.{weight,bias}` (linear)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from llava_jax.models.config import LlavaConfig, config_from_any
from llava_jax.models.projector import projector_depth

# ----- stored names -> canonical names -----------------------------------------------------

# (pattern, replacement), first match wins; applied to the key as stored in the file.
_RENAMES = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "vision_tower."),  # original LLaVA
    (re.compile(r"^model\.vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^vision_model\."), "vision_tower."),
    # CLIPVisionModel as transformers 5 saves it: the vision_model's keys with no prefix
    (re.compile(r"^(?=(?:embeddings|encoder|pre_layrnorm|post_layernorm)\.)"), "vision_tower."),
    (re.compile(r"^lm_head\.weight$"), "language_model.lm_head.weight"),
    (re.compile(r"^model\.image_newline$"), "image_newline"),  # LlavaNext in memory
]
_MM_PROJECTOR = re.compile(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")
_LLAMA = re.compile(r"^model\.")

# Keys that carry no parameter of ours: CLIP's text side and heads, non-persistent buffers.
_IGNORED = re.compile(
    r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)"
    r"|\.position_ids$|\.rotary_emb\.inv_freq$")



def canonical_key(key: str) -> Optional[str]:
    """The llava-hf name of a stored key, or None for a key that holds nothing we load."""
    if _IGNORED.search(key):
        return None
    m = _MM_PROJECTOR.match(key)
    if m:
        index, kind = m.groups()
        if index is None:  # mm_projector_type 'linear': a bare nn.Linear
            return f"multi_modal_projector.linear_1.{kind}"
        if int(index) % 2:  # odd entries of the Sequential are GELUs, which hold no weights
            return key
        return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{kind}"
    for pattern, replacement in _RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    if _LLAMA.search(key):
        return "language_model." + key
    return key


# ----- canonical names <-> our parameters ----------------------------------------------------

_TO_OURS = {None: lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
_TO_HF = {None: lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1)}


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple               # our path in nnx.state(model), e.g. ('language_model', 'norm', 'scale')
    hf_keys: tuple            # one canonical key, or one per layer when `stacked`
    hf_shape: tuple           # shape of each HF tensor (PyTorch layout)
    transform: Optional[str]  # None, 'linear' or 'conv'
    stacked: bool = False

    @property
    def shape(self) -> tuple:
        """Our parameter's shape."""
        s = self.hf_shape
        per_layer = {None: s, "linear": s[::-1], "conv": (s[2], s[3], s[1], s[0]) if len(s) == 4 else s}[self.transform]
        return ((len(self.hf_keys),) if self.stacked else ()) + per_layer

    def to_ours(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """HF tensors (one per key, in `hf_keys` order) -> our float32 array."""
        if len(tensors) != len(self.hf_keys):
            raise ValueError(f"{'.'.join(self.path)}: expected {len(self.hf_keys)} tensors, got {len(tensors)}")
        out = []
        for key, t in zip(self.hf_keys, tensors):
            t = np.asarray(t)
            if tuple(t.shape) != self.hf_shape:
                raise ValueError(f"{key}: expected shape {self.hf_shape}, found {tuple(t.shape)}")
            out.append(_TO_OURS[self.transform](t.astype(np.float32)))
        return np.ascontiguousarray(np.stack(out) if self.stacked else out[0])

    def to_hf(self, array) -> list:
        """Our array -> HF tensors (one per key, in `hf_keys` order)."""
        array = np.asarray(array)
        if tuple(array.shape) != self.shape:
            raise ValueError(f"{'.'.join(self.path)}: expected shape {self.shape}, found {tuple(array.shape)}")
        parts = list(array) if self.stacked else [array]
        return [np.ascontiguousarray(_TO_HF[self.transform](p)) for p in parts]


def _vision_entries(c: LlavaConfig) -> list:
    v = c.vision
    d, f, n = v.hidden_size, v.intermediate_size, v.num_layers
    top = [
        (("embeddings", "patch_embedding", "kernel"), "embeddings.patch_embedding.weight",
         (d, v.num_channels, v.patch_size, v.patch_size), "conv"),
        (("embeddings", "class_embedding"), "embeddings.class_embedding", (d,), None),
        (("embeddings", "position_embedding", "embedding"), "embeddings.position_embedding.weight",
         (v.num_positions, d), None),
    ]
    for norm in ("pre_layrnorm", "post_layernorm"):
        top += [((norm, "scale"), f"{norm}.weight", (d,), None), ((norm, "bias"), f"{norm}.bias", (d,), None)]
    per_layer = []
    for norm in ("layer_norm1", "layer_norm2"):
        per_layer += [((norm, "scale"), f"{norm}.weight", (d,), None), ((norm, "bias"), f"{norm}.bias", (d,), None)]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        per_layer += [(("self_attn", proj, "kernel"), f"self_attn.{proj}.weight", (d, d), "linear"),
                      (("self_attn", proj, "bias"), f"self_attn.{proj}.bias", (d,), None)]
    per_layer += [(("mlp", "fc1", "kernel"), "mlp.fc1.weight", (f, d), "linear"),
                  (("mlp", "fc1", "bias"), "mlp.fc1.bias", (f,), None),
                  (("mlp", "fc2", "kernel"), "mlp.fc2.weight", (d, f), "linear"),
                  (("mlp", "fc2", "bias"), "mlp.fc2.bias", (d,), None)]
    out = [Entry(("vision_tower",) + p, (f"vision_tower.{k}",), s, t) for p, k, s, t in top]
    out += [Entry(("vision_tower", "layers") + p,
                  tuple(f"vision_tower.encoder.layers.{i}.{k}" for i in range(n)), s, t, stacked=True)
            for p, k, s, t in per_layer]
    return out


def _projector_entries(c: LlavaConfig) -> list:
    depth = projector_depth(c.projector_type)
    d_out = c.text.hidden_size
    out = []
    for i in range(1, depth + 1):
        d_in = c.vision_feature_dim if i == 1 else d_out
        out += [Entry(("projector", f"linear_{i}", "kernel"), (f"multi_modal_projector.linear_{i}.weight",),
                      (d_out, d_in), "linear"),
                Entry(("projector", f"linear_{i}", "bias"), (f"multi_modal_projector.linear_{i}.bias",),
                      (d_out,), None)]
    if c.anyres:  # LLaVA-1.6's row-end vector: ours sits in the projector, llava-hf's at the top level
        out.append(Entry(("projector", "image_newline"), ("image_newline",), (d_out,), None))
    return out


def _text_entries(c: LlavaConfig) -> list:
    t = c.text
    d, f, n, hd = t.hidden_size, t.intermediate_size, t.num_layers, t.head_dim
    q, kv = t.num_heads * hd, t.num_kv_heads * hd
    out = [Entry(("language_model", "embed_tokens", "embedding"), ("language_model.model.embed_tokens.weight",),
                 (t.vocab_size, d), None),
           Entry(("language_model", "norm", "scale"), ("language_model.model.norm.weight",), (d,), None)]
    if not t.tie_word_embeddings:
        out.append(Entry(("language_model", "lm_head", "kernel"), ("language_model.lm_head.weight",),
                         (t.vocab_size, d), "linear"))
    per_layer = [
        (("input_layernorm", "scale"), "input_layernorm.weight", (d,), None),
        (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", (d,), None),
        (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", (q, d), "linear"),
        (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", (kv, d), "linear"),
        (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", (kv, d), "linear"),
        (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", (d, q), "linear"),
        (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", (f, d), "linear"),
        (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", (f, d), "linear"),
        (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (d, f), "linear"),
    ]
    out += [Entry(("language_model", "layers") + p,
                  tuple(f"language_model.model.layers.{i}.{k}" for i in range(n)), s, tr, stacked=True)
            for p, k, s, tr in per_layer]
    return out


COMPONENTS = ("vision_tower", "projector", "language_model")


def entries(config, components: Optional[Sequence[str]] = None) -> list:
    """Every parameter of LlavaModel(config) with its canonical llava-hf key(s); `components`
    restricts the table to some of 'vision_tower', 'projector', 'language_model'."""
    c = config_from_any(config)
    components = COMPONENTS if components is None else tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected some of {COMPONENTS}")
    build = {"vision_tower": _vision_entries, "projector": _projector_entries, "language_model": _text_entries}
    return [e for name in COMPONENTS if name in components for e in build[name](c)]


def hf_keys(config, components: Optional[Sequence[str]] = None) -> list:
    return [k for e in entries(config, components) for k in e.hf_keys]


def _set(tree: dict, path: tuple, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree, path: tuple):
    node = tree
    for p in path:
        try:
            node = node[p]
        except (KeyError, TypeError, IndexError):
            raise KeyError(f"parameter {'.'.join(path)} not found in the state (missing {p!r})") from None
    return node


def state_from_hf(tensors: Mapping[str, np.ndarray], config, *, components: Optional[Sequence[str]] = None,
                  strict: bool = False) -> dict:
    """Canonical HF tensors -> nested dict of float32 numpy arrays shaped like nnx.state(model)
    (only the given components' subtrees when `components` is set).

    Missing keys raise KeyError naming them; with `strict`, so do keys the table does not know."""
    table = entries(config, components)
    missing = [k for e in table for k in e.hf_keys if k not in tensors]
    if missing:
        raise KeyError(f"{len(missing)} llava-hf keys missing, e.g. {missing[:5]}")
    if strict:
        known = {k for e in table for k in e.hf_keys}
        extra = sorted(k for k in tensors if k not in known)
        if extra:
            raise KeyError(f"{len(extra)} unexpected llava-hf keys, e.g. {extra[:5]}")
    state: dict = {}
    for e in table:
        _set(state, e.path, e.to_ours([tensors[k] for k in e.hf_keys]))
    return state


def _pure(state):
    """Accept an nnx.State or a nested dict whose leaves are arrays or nnx Variables."""
    from flax import nnx

    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def hf_from_state(state, config, *, components: Optional[Sequence[str]] = None) -> Iterator[tuple]:
    """Our state (nnx.State or nested dict) -> (canonical key, numpy array in PyTorch layout)."""
    state = _pure(state)
    for e in entries(config, components):
        leaf = _get(state, e.path)
        leaf = leaf[...] if hasattr(leaf, "get_metadata") else leaf
        yield from zip(e.hf_keys, e.to_hf(np.asarray(leaf)))


def load_into_model(model, tensors: Mapping[str, np.ndarray], config=None, *, component: Optional[str] = None,
                    strict: bool = False):
    """Overwrite the parameters of `model` with canonical HF tensors, in place. `model` is a
    LlavaModel, or with `component` set, that component's module alone (e.g. a LlamaModel)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    config = config if config is not None else model.config
    params = nnx.state(model, nnx.Param)
    pure = state_from_hf(tensors, config, components=None if component is None else (component,), strict=strict)
    pure = jax.tree.map(jnp.asarray, pure if component is None else pure[component])
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model
