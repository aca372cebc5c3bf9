"""llava_jax.train.config: every shipped config file becomes a TrainConfig; the conversion keeps every
value, fills the keys a config lacks from the schema, and a value of the wrong type is one line
naming the key."""
import dataclasses

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from llava_jax import cli, validate
from llava_jax.config_files import load_config
from llava_jax.models.config import LlavaConfig
from llava_jax.models.lora import LoraConfig
from llava_jax.quickstart import config as quickstart
from llava_jax.recipes import llava
from llava_jax.testing.processes import REPO
from llava_jax.train.config import TrainConfig, train_config
from llava_jax.train.defaults import base_config

# Each config file and the arguments its get_config takes (None: no argument, the file's default).
_ARGS = {
    **{name: (None, *llava.STAGES) for name in (
        "llava_v1_7b", "llava_v1_13b", "llava_v1_5_7b", "llava_v1_5_13b", "llava_v1_6_vicuna_7b",
        "llava_v1_6_vicuna_13b", "llava_v1_6_mistral_7b", "llava_v1_6_34b", "tiny")},
    **{name: (None, *llava.LORA_BASE_DTYPES) for name in ("llava_v1_5_7b_lora", "llava_v1_5_13b_lora")},
    "quickstart": (None, *quickstart.STAGES),
}
SPECS = [str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg is not None else "")
         for name, args in _ARGS.items() for arg in args]
TINY = str(REPO / "configs" / "tiny.py")


def test_every_config_file_is_listed():
    assert sorted(p.stem for p in (REPO / "configs").glob("*.py")) == sorted(_ARGS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.rsplit("/", 1)[-1])
def test_every_shipped_config_converts_and_round_trips(spec):
    config = load_config(spec)
    typed = train_config(config)
    assert isinstance(typed, TrainConfig) and isinstance(typed.model, LlavaConfig)
    assert typed.to_dict() == config.to_dict()
    assert TrainConfig.from_config_dict(ml_collections.ConfigDict(typed.to_dict())) == typed
    assert train_config(typed) is typed
    assert (typed.adapters is not None) == (config.lora.rank > 0)
    if typed.adapters is not None:
        assert typed.adapters.rank == config.lora.rank and typed.adapters.base_dtype == config.lora.base_dtype


def test_values_keep_their_schema_types():
    typed = train_config(load_config(f"{TINY}:stage1"))
    assert (typed.stage, typed.global_batch_size, typed.max_length, typed.mesh.fsdp) == (1, 4, 64, -1)
    assert type(typed.num_epochs) is float and typed.num_epochs == 1.0  # an int in the file, a float here
    assert type(typed.optim.lr) is float and typed.optim.lr == 1e-3
    assert typed.data.template == "plain" and typed.data.packing is False
    assert typed.init.base == "" and typed.adapters is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.stage = 2


def test_command_line_overrides_apply_before_the_conversion():
    argv = ["prog", f"--config={TINY}:stage2", "--config.optim.lr=0.5", "--config.data.packing=True",
            "--config.mesh.fsdp=2", "--config.lora.rank=4", "--config.init.base=/m"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    values(argv)
    typed = train_config(values.config)
    assert typed.optim.lr == 0.5 and typed.data.packing is True and typed.mesh.fsdp == 2
    assert typed.adapters == LoraConfig(rank=4, alpha=16.0, dropout=0.0, base_dtype="float32")


def test_missing_keys_take_the_schema_defaults():
    d = load_config(TINY).to_dict()
    del d["lora"], d["profile_steps"], d["optim"]["b2"]
    typed = train_config(ml_collections.ConfigDict(d))
    schema = base_config()
    assert typed.profile_steps == schema.profile_steps and typed.optim.b2 == schema.optim.b2
    assert typed.lora.rank == 0 and typed.adapters is None
    assert typed.optim.lr == 1e-3  # what the file did set stays


@pytest.mark.parametrize("key, value, says", [
    ("global_batch_size", "8", "config.global_batch_size='8' (str): expected an integer"),
    ("optim.lr", "1e-3", "config.optim.lr='1e-3' (str): expected a number"),
    ("stage", True, "config.stage=True (bool): expected an integer"),
    ("data.packing", 1, "config.data.packing=1 (int): expected True or False"),
    ("mesh", 4, "config.mesh: expected a group of keys (data, fsdp, tensor), got 4"),
    ("optim.lrr", 1.0, "config.optim.lrr: no such config key (every key and its default: "
                       "llava_jax/train/defaults.py)"),
    ("model.text.num_layerz", 2, "config.model: "),
])
def test_a_wrong_value_is_one_line_naming_the_key(key, value, says):
    d = load_config(TINY).to_dict()
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(validate.ConfigError) as info:  # a UserError and a ValueError
        train_config(ml_collections.ConfigDict(d))
    message = str(info.value)
    assert "\n" not in message and message.startswith(says), message
    assert isinstance(info.value, ValueError)


def test_the_train_command_prints_the_wrong_type_on_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\nfrom llava_jax.recipes import tiny\n\n\ndef get_config(arg='stage2'):\n"
                   "    d = tiny.get_config(arg).to_dict()\n    d['max_length'] = 64.5\n"
                   "    return ml_collections.ConfigDict(d)\n")
    assert cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["llava-jax train: error: config.max_length=64.5 (float): expected an integer"]


def test_replace_keeps_adapters_in_step_with_lora():
    typed = train_config(load_config(str(REPO / "configs" / "llava_v1_5_7b_lora.py:int8")))
    assert typed.adapters.base_dtype == "int8"
    off = typed.replace(lora=dataclasses.replace(typed.lora, rank=0))
    assert off.adapters is None and off.lora.alpha == typed.lora.alpha
