"""configs/*.py: the reference's shapes and two-stage recipe, loadable by both config loaders."""
from __future__ import annotations

import os

import pytest
from absl import flags
from ml_collections import config_flags

from llava_jax.config_files import load_config, split_spec
from llava_jax.models.config import LlavaConfig, config_from_any
from llava_jax.models.projector import projector_depth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = ["llava_v1_7b", "llava_v1_13b", "llava_v1_5_7b", "llava_v1_5_13b"]


def _path(name: str) -> str:
    return os.path.join(REPO, "configs", f"{name}.py")


def test_split_spec():
    assert split_spec("configs/x.py:stage1") == ("configs/x.py", "stage1")
    assert split_spec("configs/x.py") == ("configs/x.py", None)


@pytest.mark.parametrize("name", REAL + ["tiny"])
def test_both_loaders_agree_and_model_is_valid(name):
    """The absl config_flags path (llava-jax train) and load_config (info, aot) give the same config,
    with ml_collections overrides applied on the former."""
    for arg in ("stage1", "stage2"):
        argv = ["prog", f"--config={_path(name)}:{arg}", "--config.seed=7"]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
        values(argv)
        via_flags = values.config
        direct = load_config(f"{_path(name)}:{arg}")
        assert via_flags.seed == 7 and direct.seed == 0
        via_flags.seed = 0
        assert via_flags.to_dict() == direct.to_dict()
        model = config_from_any(direct.model)
        assert isinstance(model, LlavaConfig) and model.to_dict() == direct.model.to_dict()
        projector_depth(model.projector_type)
        assert direct.stage == int(arg[-1])
    assert load_config(_path(name)).to_dict() == load_config(f"{_path(name)}:stage2").to_dict()  # default
    with pytest.raises(ValueError, match="unknown config argument 'stage3'"):
        load_config(f"{_path(name)}:stage3")


@pytest.mark.parametrize("name", REAL)
def test_real_model_shapes(name):
    m = config_from_any(load_config(_path(name)).model)
    v15 = "v1_5" in name
    big = name.endswith("13b")
    assert (m.vision.image_size, m.vision.patch_size, m.vision.hidden_size, m.vision.num_layers) == \
        ((336 if v15 else 224), 14, 1024, 24)
    assert (m.vision.intermediate_size, m.vision.num_heads, m.vision.hidden_act) == (4096, 16, "quick_gelu")
    assert m.num_image_tokens == (576 if v15 else 256)
    assert (m.vision_feature_layer, m.vision_feature_select_strategy) == (-2, "default")
    assert m.projector_type == ("mlp2x_gelu" if v15 else "linear")
    t = m.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads) == \
        ((5120, 13824, 40, 40, 40) if big else (4096, 11008, 32, 32, 32))
    assert (t.vocab_size, t.rope_theta, t.tie_word_embeddings) == (32000, 10000.0, False)
    assert (t.rms_norm_eps, t.max_position_embeddings) == ((1e-5, 4096) if v15 else (1e-6, 2048))
    # llava-hf's <image> id: just past the 32000-token vocabulary, only ever a placeholder
    assert (m.image_token_id, m.pad_token_id, m.dtype) == (32000, 0, "bfloat16")


# (stage, template, lr, global batch, epochs, image aspect) from LLAVA_REFERENCE.md §7
RECIPE = {
    ("v1_5", "stage1"): (1, "plain", 1e-3, 256, 1, "square"),
    ("v1_5", "stage2"): (2, "vicuna_v1", 2e-5, 128, 1, "pad"),
    ("v1", "stage1"): (1, "plain", 2e-3, 128, 1, "square"),
    ("v1", "stage2"): (2, "vicuna_v1", 2e-5, 32, 3, "square"),
}


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("arg", ["stage1", "stage2"])
def test_stage_recipe(name, arg):
    c = load_config(f"{_path(name)}:{arg}")
    version = "v1_5" if "v1_5" in name else "v1"
    assert (c.stage, c.data.template, c.optim.lr, c.global_batch_size, c.num_epochs, c.data.image_aspect) == \
        RECIPE[(version, arg)]
    assert (c.optim.schedule, c.optim.warmup_ratio, c.optim.weight_decay, c.optim.grad_clip) == ("cosine", 0.03, 0.0, 1.0)
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.999, 1e-8)
    assert c.max_length == 2048 and c.total_steps == 0 and c.data.source == "json"
    assert c.model.remat_policy == "nothing_saveable"


def test_tiny_is_small_float32_and_synthetic():
    for arg in ("stage1", "stage2"):
        c = load_config(f"{_path('tiny')}:{arg}")
        m = config_from_any(c.model)
        assert m.dtype == "float32" and c.data.source == "synthetic"
        assert m.text.num_layers <= 2 and m.vision.image_size <= 28 and m.text.vocab_size <= 1024
        assert c.total_steps <= 10 and c.global_batch_size <= 8 and c.max_length <= 128
        assert c.data.template == ("plain" if arg == "stage1" else "vicuna_v1")


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.py' not found"):
        load_config(str(tmp_path / "nope.py:stage1"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(AttributeError, match="empty.py' defines no get_config"):
        load_config(str(tmp_path / "empty.py"))
