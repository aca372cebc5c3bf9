"""`llava-jax info`: parameter counts from shapes alone, checked against transformers on 'meta'."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from llava_jax import cli
from llava_jax.config_files import load_config
from llava_jax.hf.configs import to_hf
from llava_jax.models.config import config_from_any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _info(capsys, spec: str) -> dict:
    assert cli.main(["info", "--config", os.path.join(REPO, "configs", spec)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["vision_tower", "projector", "language_model", "total"]
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def test_llava_v1_5_7b_counts_exactly(capsys):
    assert cli.main(["info", "--config", os.path.join(REPO, "configs", "llava_v1_5_7b.py:stage2")]) == 0
    assert capsys.readouterr().out == ("vision_tower: 303507456\nprojector: 20979712\n"
                                       "language_model: 6738415616\ntotal: 7062902784\n")


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "model_type"}


def _torch_counts(model_config) -> dict:
    """The same shapes built in transformers on the meta device (nothing allocated)."""
    d = to_hf(model_config.replace(projector_type="mlp2x_gelu"))
    vision = transformers.CLIPVisionConfig(**_strip(d["vision_config"]))
    text = transformers.LlamaConfig(**_strip(d["text_config"]))
    numel = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        if model_config.projector_type == "mlp2x_gelu":
            kw = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "vision_config", "text_config")}
            llava = transformers.LlavaForConditionalGeneration(
                transformers.LlavaConfig(vision_config=vision, text_config=text, **kw))
            return dict(vision_tower=numel(llava.model.vision_tower),
                        projector=numel(llava.model.multi_modal_projector),
                        language_model=numel(llava.model.language_model) + numel(llava.lm_head),
                        total=numel(llava))
        assert model_config.projector_type == "linear"  # LLaVA v1: no llava-hf equivalent
        parts = dict(vision_tower=numel(transformers.CLIPVisionModel(vision)),
                     projector=numel(torch.nn.Linear(vision.hidden_size, text.hidden_size)),
                     language_model=numel(transformers.LlamaForCausalLM(text)))
    return {**parts, "total": sum(parts.values())}


@pytest.mark.parametrize("name", ["llava_v1_7b", "llava_v1_13b", "llava_v1_5_13b", "tiny"])
def test_counts_match_transformers(capsys, name):
    ours = _info(capsys, f"{name}.py")
    assert ours == _torch_counts(config_from_any(load_config(os.path.join(REPO, "configs", f"{name}.py")).model))


def test_console_script(tmp_path):
    """The installed `llava-jax info` entry point, and an unknown projector type in a config."""
    script = os.path.join(os.path.dirname(sys.executable), "llava-jax")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([script, "info", "--config", "configs/tiny.py:stage1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("total: ")

    (tmp_path / "bad.py").write_text(
        "from llava_jax.recipes import tiny\n\n"
        "def get_config(arg='stage2'):\n    c = tiny.get_config(arg)\n"
        "    c.model.projector_type = 'mlp2x_relu'\n    return c\n")
    r = subprocess.run([script, "info", "--config", str(tmp_path / "bad.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown projector type 'mlp2x_relu'" in r.stderr
    assert "llava-jax info: error: --config " in r.stderr and "Traceback" not in r.stderr
