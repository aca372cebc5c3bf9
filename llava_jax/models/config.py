"""Model configuration: frozen dataclasses and their JSON round trip (the llava-hf `config.json`
mapping is llava_jax.hf.configs).

The dataclasses are hashable so that a module holding one stays a static part of an NNX graphdef.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

# `LlavaConfig.attention_impl`; llava_jax.models.layers.resolve_attention_impl says what each runs.
ATTENTION_IMPL_NAMES = ("auto", "xla", "xla_blocked", "splash")
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
    # 'auto' (splash kernel on TPU; elsewhere XLA's attention, skipping fully masked causal blocks
    # from 2 query blocks on) | 'xla' (dense) | 'xla_blocked' | 'splash'; see layers.resolve_attention_impl
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
        if self.attention_impl not in ATTENTION_IMPL_NAMES:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; "
                             f"expected one of {list(ATTENTION_IMPL_NAMES)}")
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


def config_from_any(obj: Any) -> LlavaConfig:
    """Accept a LlavaConfig, our JSON dict, or an ml_collections ConfigDict with the same keys."""
    if isinstance(obj, LlavaConfig):
        return obj
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return LlavaConfig.from_dict(obj)
