"""LoRA adapters on the LLaMA decoder's linear layers, over a frozen float32, bfloat16 or int8 base.

`LoraConfig` says which projections get adapters (q/k/v/o/gate/up/down, the reference's "every
Linear of the LLM"), their rank, alpha and dropout, and how the frozen base kernels are held.
With LoRA on, every decoder projection is a `LoraDense`: `kernel` keeps the plain layer's name (so
base checkpoints, the HF key table and sharding rules apply unchanged), adapted ones add
`lora_a` (in, r) and `lora_b` (r, out); `y = x @ W + dropout(x) @ A @ B * alpha / r` (peft's
LoraLayer computation, its layout transposed). An int8 base stores `kernel` as int8 with a
float32 `kernel_scale` per output channel (symmetric, max-abs / 127).

Adapters are created inside the stacked layers, so they carry the "layers" axis and the logical
names of the kernel they adapt: lora_a takes the kernel's input axis, lora_b its output axis, the
rank axis is replicated. Only Params named lora_a / lora_b (and the projector) are trained
(`is_trainable`); everything else is frozen and gets no gradient.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models import layers as L

# Short target names (the config's) -> the projection's (parent, attribute) in a DecoderLayer.
TARGETS = {
    "q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
ALL_TARGETS = tuple(TARGETS)
BASE_DTYPES = ("float32", "bfloat16", "int8")
ADAPTER_NAMES = ("lora_a", "lora_b")
SCALE_NAME = "kernel_scale"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hashable (a static part of the graphdef)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ALL_TARGETS          # among q, k, v, o, gate, up, down
    base_dtype: str = "float32"           # how the frozen base kernels are held: float32 | bfloat16 | int8
    train_projector: bool = True          # the reference trains the projector fully beside the adapters

    def __post_init__(self):
        from llava_jax.validate import ConfigError

        targets = self.targets
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        targets = tuple(_short_name(t) for t in targets)
        object.__setattr__(self, "targets", targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ConfigError(f"config.lora.targets: {unknown or 'nothing'} matches no LLM projection; "
                              f"choose among {', '.join(ALL_TARGETS)} (or their *_proj names)")
        if int(self.rank) < 1:
            raise ConfigError(f"config.lora.rank must be >= 1, got {self.rank}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"config.lora.base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"config.lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / float(self.rank)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), targets=list(self.targets))

    def check_shapes(self, text_config) -> None:
        """A rank larger than a layer's smaller side is refused, naming the layer."""
        from llava_jax.validate import ConfigError

        for name in self.targets:
            din, dout = projection_shape(text_config, name)
            if self.rank > min(din, dout):
                raise ConfigError(f"config.lora.rank {self.rank} is larger than the {TARGETS[name][1]} layer "
                                  f"({din} -> {dout}); use rank <= {min(din, dout)}")


def _short_name(name: str) -> str:
    name = str(name).strip()
    return name[:-len("_proj")] if name.endswith("_proj") else name


def projection_shape(text_config, name: str) -> tuple:
    """(in, out) of a decoder projection."""
    t = text_config
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    d, f = t.hidden_size, t.intermediate_size
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}[name]


def from_config(lora_config) -> Optional[LoraConfig]:
    """LoraConfig from an ml_collections config.lora (or a dict); None when absent or rank 0 (LoRA off)."""
    if lora_config is None:
        return None
    d = lora_config.to_dict() if hasattr(lora_config, "to_dict") else dict(lora_config)
    if not int(d.get("rank", 0) or 0):
        return None
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        from llava_jax.validate import ConfigError

        raise ConfigError(f"config.lora has unknown keys {unknown}; known: {sorted(known)}")
    targets = d.get("targets", ALL_TARGETS)
    d["targets"] = tuple(targets) if isinstance(targets, (list, tuple)) else targets
    return LoraConfig(**d)


# ----- int8 base ------------------------------------------------------------------------------

def base_kernel(kernel, scale=None, dtype=jnp.float32):
    """The frozen base kernel as `dtype` (dequantized when an int8 scale is given)."""
    w = jnp.asarray(kernel).astype(dtype)
    return w if scale is None else w * jnp.asarray(scale).astype(dtype)[..., None, :]


# ----- dropout randomness ---------------------------------------------------------------------

class LoraSalt(nnx.Variable):
    """A per-module, per-layer random int: folded into the step's dropout key so every adapter of
    every layer draws its own mask (not a Param: never trained, never exported)."""


_DROPOUT_KEY: list = [None]


@contextlib.contextmanager
def dropout_key(key):
    """Adapter dropout is active while tracing inside this block (the train step's loss); outside
    it (evaluation, inference) adapters run without dropout, as peft's eval mode does."""
    _DROPOUT_KEY.append(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.pop()


# ----- the layer ------------------------------------------------------------------------------

class LoraDense(nnx.Module):
    """A bias-free Dense with a frozen base kernel (float32, bfloat16 or int8 + scale) and, when
    `adapted`, a rank-r adapter; the same parameter names as `layers.Dense` for the base."""

    def __init__(self, in_features: int, out_features: int, *, axes, lora: LoraConfig, adapted: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        axes = tuple(axes)
        kernel = L.normal_init()(rngs.params(), (in_features, out_features), jnp.float32)
        scale = None
        if lora.base_dtype == "int8":
            kernel, scale = L.quantize_int8(kernel)
        else:
            kernel = kernel.astype(jnp.dtype(lora.base_dtype))
        self.kernel = nnx.Param(kernel, out_sharding=axes)
        self.kernel_scale = None if scale is None else nnx.Param(scale, out_sharding=axes[1:])
        # peft's init: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0 (the adapter starts as a no-op).
        bound = 1.0 / math.sqrt(in_features)
        self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (in_features, lora.rank), jnp.float32, -bound,
                                                   bound), out_sharding=(axes[0], None)) if adapted else None
        self.lora_b = nnx.Param(jnp.zeros((lora.rank, out_features), jnp.float32),
                                out_sharding=(None, axes[1])) if adapted else None
        self.salt = LoraSalt(jax.random.randint(rngs.params(), (), 0, 2**31 - 1, jnp.int32)) if (
            adapted and lora.dropout > 0) else None
        self.scaling = lora.scaling
        self.dropout = float(lora.dropout)
        self.dtype = dtype

    def __call__(self, x):
        rows = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = L.matmul(rows, self.kernel[...].astype(self.dtype))
        if self.kernel_scale is not None:
            y = y * self.kernel_scale[...].astype(self.dtype)
        if self.lora_a is not None:
            h = rows
            key = _DROPOUT_KEY[-1]
            if self.dropout > 0 and key is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt[...]), 1.0 - self.dropout, rows.shape)
                h = jnp.where(keep, rows / (1.0 - self.dropout), 0).astype(rows.dtype)
            a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
            y = y + L.matmul(L.matmul(h, a), b) * jnp.asarray(self.scaling, self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(name: str, in_features: int, out_features: int, *, axes, lora: Optional[LoraConfig], dtype,
           rngs: nnx.Rngs, weights: str = "float32"):
    """The decoder projection `name` (a TARGETS key): without LoRA a plain projection whose kernel is
    held as `weights` (`layers.dense`), else a LoraDense."""
    if lora is None:
        return L.dense(in_features, out_features, axes=axes, weights=weights, dtype=dtype, rngs=rngs)
    return LoraDense(in_features, out_features, axes=axes, lora=lora, adapted=name in lora.targets, dtype=dtype,
                     rngs=rngs)


class LoraGatedMLP(L.GatedMLP):
    """`layers.GatedMLP` (same forward) whose three projections are `linear`s."""

    def __init__(self, features: int, hidden: int, *, lora: LoraConfig, dtype, rngs: nnx.Rngs):
        kw = dict(lora=lora, dtype=dtype, rngs=rngs)
        self.gate_proj = linear("gate", features, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = linear("up", features, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = linear("down", hidden, features, axes=("mlp", "embed"), **kw)


# ----- pure functions over parameter dicts ----------------------------------------------------

def is_trainable(lora: LoraConfig):
    """nnx filter for the LoRA run: adapters, and the projector when it trains."""
    def trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param) or not path:
            return False
        return str(path[-1]) in ADAPTER_NAMES or (lora.train_projector and str(path[0]) == "projector")

    return trainable


def layer_modules(params: dict):
    """(target, module dict) for every projection of the stacked decoder layers in a parameter dict."""
    layers = params["language_model"]["layers"]
    for target, (parent, attr) in TARGETS.items():
        yield target, layers[parent][attr]


def merged_params(params: dict, lora: LoraConfig) -> dict:
    """The plain model's parameter dict (float32 kernels W + A @ B * alpha / r; no adapter leaves)
    from a LoRA model's full parameter dict: what `merge` writes and inference loads."""
    out = jax.tree.map(lambda x: x, params)  # a new dict tree sharing the leaves
    layers = dict(out["language_model"]["layers"])
    out["language_model"] = dict(out["language_model"], layers=layers)
    for target, (parent, attr) in TARGETS.items():
        module = dict(layers[parent][attr])
        w = base_kernel(module.pop("kernel"), module.pop(SCALE_NAME, None))
        a, b = module.pop("lora_a", None), module.pop("lora_b", None)
        module.pop("salt", None)
        if a is not None:
            w = w + jnp.einsum("lir,lro->lio", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) * lora.scaling
        layers[parent] = dict(layers[parent], **{attr: dict(module, kernel=w)})
    return out


def base_params_for(plain: dict, lora: LoraConfig) -> dict:
    """A plain model's parameters -> the frozen base of a LoRA model (kernels quantized or cast as
    `lora.base_dtype` says; adapters are not included)."""
    out = jax.tree.map(lambda x: x, plain)
    layers = dict(out["language_model"]["layers"])
    out["language_model"] = dict(out["language_model"], layers=layers)
    for target, (parent, attr) in TARGETS.items():
        kernel = layers[parent][attr]["kernel"]
        if lora.base_dtype == "int8":
            q, scale = L.quantize_int8(kernel)
            module = {"kernel": q, SCALE_NAME: scale}
        else:
            module = {"kernel": jnp.asarray(kernel).astype(jnp.dtype(lora.base_dtype))}
        layers[parent] = dict(layers[parent], **{attr: module})
    return out


def adapter_params(params: dict) -> dict:
    """The lora_a / lora_b leaves of a (full or trainable) parameter dict, same nesting."""
    out = {}
    for target, (parent, attr) in TARGETS.items():
        module = params.get("language_model", {}).get("layers", {}).get(parent, {}).get(attr, {})
        picked = {k: module[k] for k in ADAPTER_NAMES if k in module}
        if picked:
            out.setdefault(parent, {})[attr] = picked
    return {"language_model": {"layers": out}} if out else {}


def float32_base_target(full_target: dict) -> dict:
    """A restore target (nested ShapeDtypeStructs) whose adapted-layer kernels are float32: base
    checkpoints hold float32 kernels that `to_base_dtype` then casts or quantizes."""
    out = jax.tree.map(lambda x: x, full_target)
    layers = out["language_model"]["layers"]
    for target, (parent, attr) in TARGETS.items():
        k = layers[parent][attr]["kernel"]
        layers[parent][attr]["kernel"] = jax.ShapeDtypeStruct(k.shape, jnp.float32, sharding=getattr(k, "sharding", None))
    return out


def to_base_dtype(loaded: dict, lora: LoraConfig) -> dict:
    """Loaded float32 kernels of the decoder projections -> the LoRA base's dtype (int8 adds the
    kernel_scale leaves); other leaves are kept."""
    layers = loaded.get("language_model", {}).get("layers")
    if not layers or lora.base_dtype == "float32":
        return loaded
    for target, (parent, attr) in TARGETS.items():
        module = layers.get(parent, {}).get(attr)
        if module is None or "kernel" not in module:
            continue
        if lora.base_dtype == "int8":
            module["kernel"], module[SCALE_NAME] = jax.jit(L.quantize_int8)(module["kernel"])
        else:
            module["kernel"] = module["kernel"].astype(jnp.dtype(lora.base_dtype))
    return loaded
