"""The typed training config: what `llava-jax train`, `aot` and `plan` (and the code under them) read.

A config file builds an ml_collections ConfigDict (`llava_jax/train/defaults.py` holds the schema:
every key, its default, what it means), because `--config.x.y=v` overrides need one. Each entry point
converts it here, once, after the overrides, and passes the frozen `TrainConfig` down: every value
then has the schema's type, the model is a `LlavaConfig` and the LoRA settings a `LoraConfig`, so the
code below reads fields instead of casting. The groups mirror the ConfigDict's, so `config.optim.lr`
and `--config.optim.lr` name the same thing.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from typing import Any, Optional

from llava_jax.models import lora as lora_lib
from llava_jax.models.config import LlavaConfig, config_from_any
from llava_jax.train.defaults import base_config
from llava_jax.validate import ConfigError

SCHEMA_FILE = "llava_jax/train/defaults.py"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float
    projector_lr: float      # 0 = lr
    warmup_ratio: float
    schedule: str            # cosine | constant
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float         # 0 = no clipping


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int                # one of the three may be -1: the remaining devices
    fsdp: int
    tensor: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str              # synthetic | json | arrayrecord
    json_path: str           # comma-separated for a mixture
    weights: str
    image_folder: str
    arrayrecord_dir: str
    eval_json_path: str
    eval_arrayrecord_dir: str
    template: str
    image_aspect: str        # pad | square
    packing: bool
    group_by_modality_length: bool
    max_images_per_row: int
    num_workers: int
    shuffle_seed: int
    strict: bool
    synthetic_size: int


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """config.lora as set (rank 0 = off); `TrainConfig.adapters` is the LoraConfig it describes."""

    rank: int
    alpha: float
    dropout: float
    targets: str             # comma-separated LLM projections
    base_dtype: str          # float32 | bfloat16 | int8
    train_projector: bool


@dataclasses.dataclass(frozen=True)
class InitConfig:
    base: str                # model folder the run starts from ("" = random init)
    stage1: str              # stage-1 workdir whose projector stage 2 starts from


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training config, typed. Build it with `train_config(config_dict)`; what each field means and
    its default are in llava_jax/train/defaults.py."""

    model: LlavaConfig
    stage: int
    seed: int
    total_steps: int         # 0 = from num_epochs and the dataset size
    num_epochs: float
    global_batch_size: int
    microbatch_size: int     # 0 = no accumulation
    max_length: int
    optim: OptimConfig
    mesh: MeshConfig
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int
    eval_batches: int
    loss_chunk_size: int
    peak_flops_per_device: float
    profile_steps: str
    data: DataConfig
    lora: LoraSettings
    tokenizer: str
    init: InitConfig
    # Derived from `lora` whenever one is made (dataclasses.replace included), so the two never disagree.
    adapters: Optional[lora_lib.LoraConfig] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "adapters", lora_lib.from_config(dataclasses.asdict(self.lora)))

    @classmethod
    def from_config_dict(cls, config) -> "TrainConfig":
        """An ml_collections training config (or its nested dict) -> TrainConfig. Keys it lacks take the
        schema's defaults; a key the schema lacks or a value of the wrong type raises ConfigError
        (a ValueError) naming the key."""
        values = _plain(config)
        if not isinstance(values, dict):
            raise ConfigError(f"a training config is an ml_collections ConfigDict, got {type(config).__name__}")
        return _build(cls, values, base_config().to_dict(), "config")

    def to_dict(self) -> dict:
        """The nested dict of the ConfigDict this was made from (model as LlavaConfig.to_dict())."""
        out = dataclasses.asdict(self)
        out.pop("adapters")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def train_config(config) -> TrainConfig:
    """What public functions call on their `config` argument: a TrainConfig as it is, an ml_collections
    ConfigDict converted (TrainConfig.from_config_dict)."""
    if isinstance(config, TrainConfig):
        return config
    return TrainConfig.from_config_dict(config)


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def _build(cls, values: dict, defaults: dict, where: str):
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: no such config key (every key and its default: {SCHEMA_FILE})")
    return cls(**{name: _field(hints[name], _plain(values[name]) if name in values else defaults[name],
                               defaults[name], f"{where}.{name}") for name in fields})


def _field(kind, value, default, key: str) -> Any:
    if kind is LlavaConfig:
        try:
            return config_from_any(value)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{key}: {e}") from None
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a group of keys ({', '.join(default)}), got {value!r}")
        return _build(kind, value, default, key)
    # bool is an int to Python, and an int where a float is due is the same number: allowed one way only.
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}={value!r} ({type(value).__name__}): expected {_type_name(kind)}")


def _type_name(kind) -> str:
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
