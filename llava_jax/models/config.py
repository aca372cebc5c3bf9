"""Model configuration: frozen dataclasses, JSON round trip, and the llava-hf `config.json` mapping.

The dataclasses are hashable so that a module holding one stays a static part of an NNX graphdef.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

_FEATURE_STRATEGIES = {"default": "default", "patch": "default", "full": "full", "cls_patch": "full"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is 'linear' or 'llama3' (the transformers names)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r}; expected 'linear' or 'llama3'")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower. Defaults are CLIP ViT-L/14 at 336 px."""

    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA-style decoder. Defaults are LLaMA-7B / Vicuna-7B v1.5."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # The transformers architecture the decoder is exported as: 'llama', or 'mistral' (LLaVA-1.6-Mistral;
    # without a sliding window a Mistral decoder is exactly a LLaMA one).
    hf_model_type: str = "llama"

    def __post_init__(self):
        if self.hf_model_type not in ("llama", "mistral"):
            raise ValueError(f"unsupported decoder model_type {self.hf_model_type!r}; expected 'llama' or 'mistral'")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    # 'linear', 'mlp{N}x_gelu' or 'identity' (the reference's mm_projector_type names).
    projector_type: str = "mlp2x_gelu"
    # An int or a tuple of ints; negative values index from the end of hidden_states
    # (hidden_states[0] is the embedding output after pre-LN, as in transformers).
    vision_feature_layer: Union[int, tuple] = -2
    # 'default' drops the CLS token, 'full' keeps it ('patch'/'cls_patch' are accepted aliases).
    vision_feature_select_strategy: str = "default"
    image_token_id: int = 32000
    pad_token_id: int = 0
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat_policy: str = "nothing_saveable"  # see llava_jax.models.layers.REMAT_POLICIES
    # 'auto' (splash kernel on TPU, XLA's attention elsewhere) | 'xla' | 'splash'; see models/splash.py
    attention_impl: str = "auto"
    # LLaVA-1.6 AnyRes: the (height, width) grids an image may be tiled into (None: one image = one
    # tile, LLaVA-1/1.5). See llava_jax.data.anyres and llava_jax.models.llava_next.
    image_grid_pinpoints: Optional[tuple] = None

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        strategy = _FEATURE_STRATEGIES.get(self.vision_feature_select_strategy)
        if strategy is None:
            raise ValueError(
                f"unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}; "
                f"expected one of {sorted(_FEATURE_STRATEGIES)}")
        object.__setattr__(self, "vision_feature_select_strategy", strategy)
        if self.attention_impl not in ("auto", "xla", "splash"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; expected 'auto', 'xla' or 'splash'")
        if self.image_grid_pinpoints is not None:
            self._check_anyres()

    def _check_anyres(self):
        tile = self.vision.image_size
        try:
            points = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
        except (TypeError, ValueError):
            raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs; "
                             f"got {self.image_grid_pinpoints!r}") from None
        bad = [list(p) for p in points if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
        if not points or bad:
            raise ValueError(f"image_grid_pinpoints {bad or '[]'} do not fit the vision tower: each [height, width] "
                             f"must be a positive multiple of its image_size {tile}")
        object.__setattr__(self, "image_grid_pinpoints", points)
        if self.vision_feature_select_strategy != "default":
            raise ValueError("AnyRes (image_grid_pinpoints) needs vision_feature_select_strategy 'default': the tile "
                             "features are reassembled into a grid, which the CLS token has no place in")

    @property
    def anyres(self) -> bool:
        return self.image_grid_pinpoints is not None

    @property
    def feature_layers(self) -> tuple:
        layers = self.vision_feature_layer
        return tuple(layers) if isinstance(layers, (tuple, list)) else (layers,)

    @property
    def num_image_tokens(self) -> int:
        """Feature tokens per image: the llava-hf processor repeats the placeholder this many times.
        With AnyRes: per tile (the base image's share); an image's total depends on its size
        (llava_jax.data.anyres.num_image_tokens)."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def vision_feature_dim(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    # ----- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        d = dict(d)
        text = dict(d.pop("text", {}))
        if text.get("rope_scaling"):
            text["rope_scaling"] = RopeScaling(**text["rope_scaling"])
        vision = VisionConfig(**d.pop("vision", {}))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LlavaConfig keys {sorted(unknown)}")
        return cls(vision=vision, text=TextConfig(**text), **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> "LlavaConfig":
        return cls.from_dict(json.loads(s))

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)


# ----- transformers config.json mapping -------------------------------------------------------

def vision_from_hf(v: dict) -> VisionConfig:
    return VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], num_channels=v.get("num_channels", 3),
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"))


def vision_to_hf(v: VisionConfig) -> dict:
    return dict(model_type="clip_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                num_channels=v.num_channels, hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)


def text_from_hf(t: dict) -> TextConfig:
    rope = dict(t.get("rope_parameters") or {})
    legacy = t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    params = {**legacy, **rope}
    scaling = None
    if rope_type != "default":
        kw = {k: params[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
              if k in params}
        scaling = RopeScaling(rope_type=rope_type, factor=float(params["factor"]), **kw)
    return TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim"), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", t.get("rope_theta", 10000.0))), rope_scaling=scaling,
        max_position_embeddings=t.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        bos_token_id=t.get("bos_token_id", 1) if t.get("bos_token_id") is not None else 1,
        eos_token_id=_first(t.get("eos_token_id", 2)), hf_model_type=_decoder_type(t))


def _decoder_type(t: dict) -> str:
    kind = t.get("model_type", "llama")
    if kind not in ("llama", "mistral"):
        raise ValueError(f"unsupported text_config model_type {kind!r}; expected 'llama' or 'mistral'")
    window = t.get("sliding_window")
    if kind == "mistral" and window is not None and window < t.get("max_position_embeddings", 0):
        raise ValueError(f"text_config has sliding_window={window}: sliding-window attention is not supported "
                         f"(LLaVA-1.6-Mistral's Mistral-7B-Instruct-v0.2 has none)")
    return kind


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else (2 if x is None else x)


def text_to_hf(t: TextConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        rope = {"rope_type": s.rope_type, "factor": s.factor, "rope_theta": t.rope_theta}
        if s.rope_type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    # Mistral's config has no attention_bias / mlp_bias and a sliding_window (None: full attention).
    extra = dict(sliding_window=None) if t.hf_model_type == "mistral" else dict(attention_bias=False, mlp_bias=False)
    return dict(model_type=t.hf_model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_parameters=rope,
                max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, hidden_act="silu", **extra)


def from_hf(d: dict) -> LlavaConfig:
    """LlavaConfig from a llava-hf `config.json` dict."""
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported projector_hidden_act {act!r} in llava config; expected 'gelu'")
    layer = d.get("vision_feature_layer", -2)
    return LlavaConfig(
        vision=vision_from_hf(d["vision_config"]), text=text_from_hf(d["text_config"]),
        projector_type="mlp2x_gelu",
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else 0,
        image_grid_pinpoints=_pinpoints_from_hf(d))


def _pinpoints_from_hf(d: dict):
    if d.get("model_type") != "llava_next":
        return None
    return tuple(tuple(p) for p in d.get("image_grid_pinpoints") or ((336, 672), (672, 336), (672, 672),
                                                                     (1008, 336), (336, 1008)))


def to_hf(c: LlavaConfig) -> dict:
    """The llava-hf `config.json` dict; only the 'mlp2x_gelu' projector exists in that format."""
    if c.projector_type != "mlp2x_gelu":
        raise ValueError(f"projector {c.projector_type!r} has no llava-hf equivalent "
                         "(LlavaForConditionalGeneration only has the 2-layer GELU MLP)")
    layer = c.vision_feature_layer
    out = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"],
               vision_config=vision_to_hf(c.vision), text_config=text_to_hf(c.text),
               image_token_index=c.image_token_id, image_seq_length=c.num_image_tokens,
               projector_hidden_act="gelu", multimodal_projector_bias=True,
               vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
               vision_feature_select_strategy=c.vision_feature_select_strategy,
               pad_token_id=c.pad_token_id, tie_word_embeddings=c.text.tie_word_embeddings)
    if c.anyres:  # LlavaNextForConditionalGeneration: the same keys plus the grids (and image_newline weights)
        out.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                   image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints])
    return out


def config_from_any(obj: Any) -> LlavaConfig:
    """Accept a LlavaConfig, our JSON dict, or an ml_collections ConfigDict with the same keys."""
    if isinstance(obj, LlavaConfig):
        return obj
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return LlavaConfig.from_dict(obj)
