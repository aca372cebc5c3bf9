"""llava_jax.validate: a config that cannot run on this machine is refused before anything is built,
with a setting that works for this device count (checked here by validating the suggestion too)."""
import copy
import re

import pytest

from llava_jax import validate
from llava_jax.config_files import load_config
from llava_jax.testing.processes import REPO

TINY = str(REPO / "configs" / "tiny.py")


def _tiny(arg="stage2", **overrides):
    config = load_config(f"{TINY}:{arg}")
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _error(config, num_devices, **kwargs) -> str:
    with pytest.raises(validate.ConfigError) as info:
        validate.check_train(config, num_devices, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _apply(config, flags: str):
    """A copy of config with the suggested --config.k=v flags applied."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, value in re.findall(r"--config\.([\w.]+)=(-?\w+)", flags):
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = int(value) if value.lstrip("-").isdigit() else value
    return config


def test_the_tiny_configs_pass_on_one_and_four_devices():
    for arg in ("stage1", "stage2"):
        validate.check_train(_tiny(arg), 1)
        validate.check_train(_tiny(arg), 4)


def test_batch_smaller_than_the_devices_is_refused_with_suggestions_that_work():
    # the case: tiny stage 2 (global batch 4) with --config.mesh.fsdp=8 on 8 devices
    config = _tiny(**{"mesh.fsdp": 8})
    message = _error(config, 8)
    assert message.startswith("global_batch_size=4 is not divisible by the 8 data-parallel devices")
    assert "--config.global_batch_size=8" in message
    mesh_fix = message.split(", or ")[1]
    assert mesh_fix == "--config.mesh.fsdp=4 --config.mesh.tensor=2"
    validate.check_train(_apply(config, mesh_fix), 8)                      # the mesh suggestion passes
    validate.check_train(_tiny(**{"mesh.fsdp": 8, "global_batch_size": 8}), 8)  # so does the batch


def test_default_mesh_takes_every_device_and_the_batch_must_divide():
    # a real user's case: global batch 128 on 256 chips with the default fsdp=-1
    message = _error(load_config(str(REPO / "configs" / "llava_v1_5_7b.py:stage2")), 256, check_paths=False)
    assert "global_batch_size=128 is not divisible by the 256 data-parallel devices" in message
    assert "--config.global_batch_size=256" in message and "--config.mesh.tensor=2" in message


def test_mesh_that_does_not_cover_the_devices():
    message = _error(_tiny(**{"mesh.fsdp": 8}), 2)
    assert "mesh data=1 fsdp=8 tensor=1 does not cover the 2 devices" in message
    assert message.endswith("set --config.mesh.fsdp=2")
    # 3 devices: fsdp/tensor 3 divide no model dimension; data=3 with a batch of 6 does
    message = _error(_tiny(), 3)
    assert message.endswith("set --config.mesh.data=3 --config.mesh.fsdp=1 --config.global_batch_size=6")
    validate.check_train(_tiny(**{"mesh.data": 3, "mesh.fsdp": 1, "global_batch_size": 6}), 3)


def test_parameter_dimensions_must_divide_over_their_mesh_axes():
    # tiny: the LLM's MLP has 96 columns, which 64 tensor-parallel devices cannot split
    config = _tiny(global_batch_size=64, **{"mesh.fsdp": 1, "mesh.tensor": 64})
    message = _error(config, 64)
    assert "split over tensor = 64 devices" in message
    fix = message.split("; set ")[-1]
    assert fix.startswith("--config.mesh.")
    validate.check_train(_apply(config, fix), 64)


def test_microbatch_must_divide_the_batch_and_split_over_the_data_devices():
    message = _error(_tiny(global_batch_size=8, microbatch_size=3), 1)
    assert "global_batch_size=8 is not a multiple of microbatch_size=3" in message
    assert "--config.microbatch_size=4" in message
    message = _error(_tiny(global_batch_size=8, microbatch_size=2, **{"mesh.fsdp": 4}), 4)
    assert "microbatch_size=2 is not divisible by the 4 data-parallel devices" in message
    assert "--config.microbatch_size=4" in message


def test_max_length_must_leave_room_after_the_image_tokens():
    message = _error(_tiny(max_length=4), 1)  # tiny: 4 image tokens per row
    assert "max_length=4 leaves no room for text after the 4 image tokens" in message
    assert "--config.max_length=128" in message


def test_stage_init_and_template():
    message = _error(_tiny("stage1", **{"init.stage1": "/some/run"}), 1, check_paths=False)
    assert "init.stage1='/some/run' is for stage 2" in message and "--config.init.stage1=''" in message
    message = _error(_tiny(stage=3), 1)
    assert "stage=3 is not a training stage" in message
    message = _error(_tiny(**{"data.template": "vicuna_v2"}), 1)
    assert "data.template='vicuna_v2' is not a conversation template" in message
    assert "set --config.data.template=vicuna_v1" in message


def test_missing_paths_and_hub_ids(tmp_path):
    message = _error(_tiny(**{"init.base": "llava-hf/llava-1.5-7b-hf"}), 1)
    assert "init.base: no such model folder: llava-hf/llava-1.5-7b-hf" in message
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir DIR" in message
    message = _error(_tiny(**{"data.source": "json", "data.json_path": str(tmp_path / "nope.json")}), 1)
    assert f"data.json_path: no such file: {tmp_path / 'nope.json'}" in message
    with pytest.raises(validate.NotAFolder, match="huggingface-cli download"):
        validate.require_folder("llava-hf/llava-1.5-7b-hf", "HF model folder")


def test_problems_are_reported_together_and_aot_spells_its_own_flags():
    config = _tiny(max_length=4, **{"mesh.fsdp": 8, "data.template": "nope"})
    message = _error(config, 8, style="aot")
    assert "global_batch_size=4" in message and "max_length=4" in message and "'nope'" in message
    assert "--global-batch=8" in message and "--mesh=1,4,2" in message and "--max-length=128" in message


def test_tokenizer_larger_than_the_vocabulary():
    class Tok:
        def __len__(self):
            return 500

    with pytest.raises(validate.ConfigError, match="the tokenizer has 500 tokens but the model's embedding "
                                                   "table has 128 rows"):
        validate.check_tokenizer(_tiny(), Tok())


def test_accelerator_types():
    assert validate.device_count_of("v4-32") == (16, 4)
    assert validate.device_count_of("v5litepod-8") == (8, 1)
    assert validate.device_count_of("v5litepod-256") == (256, 64)
    assert validate.device_count_of("v5p-64") == (32, 8)
    with pytest.raises(validate.UserError):
        validate.device_count_of("tpu-big")
