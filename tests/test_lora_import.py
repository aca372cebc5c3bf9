"""Reading the reference's LoRA checkpoint layout (peft adapter on LlavaLlamaForCausalLM + the
projector in non_lora_trainables.bin) and refusing adapters that do not fit, naming the key."""
import json

import numpy as np
import pytest
import torch

from llava_jax import peft_io
from llava_jax.recipes.tiny import tiny_llava_config

RANK = 2


def _reference_folder(folder, cfg, *, extra=None, bad_shape=False, drop_layer=None):
    """What the reference's finetune_lora.sh saves: keys under base_model.model.model.layers.N."""
    t = cfg.text
    rng = np.random.default_rng(0)
    tensors, expected = {}, {}
    shapes = {"self_attn.q_proj": (t.hidden_size, t.num_heads * t.head_dim),
              "mlp.down_proj": (t.intermediate_size, t.hidden_size)}
    for name, (din, dout) in shapes.items():
        for i in range(t.num_layers):
            if i == drop_layer:
                continue
            a = rng.normal(size=(RANK, din + (1 if bad_shape else 0))).astype(np.float32)
            b = rng.normal(size=(dout, RANK)).astype(np.float32)
            tensors[f"base_model.model.model.layers.{i}.{name}.lora_A.weight"] = torch.from_numpy(a)
            tensors[f"base_model.model.model.layers.{i}.{name}.lora_B.weight"] = torch.from_numpy(b)
            expected[(name, i)] = (a.T, b.T)
    tensors.update(extra or {})
    torch.save(tensors, folder / "adapter_model.bin")
    d, v = t.hidden_size, cfg.vision_feature_dim
    projector = {"base_model.model.model.mm_projector.0.weight": torch.randn(d, v),
                 "base_model.model.model.mm_projector.0.bias": torch.randn(d),
                 "base_model.model.model.mm_projector.2.weight": torch.randn(d, d),
                 "base_model.model.model.mm_projector.2.bias": torch.randn(d)}
    torch.save(projector, folder / "non_lora_trainables.bin")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 4, "lora_dropout": 0.05,
         "target_modules": ["q_proj", "down_proj"], "task_type": "CAUSAL_LM"}))
    return expected, projector


def test_reads_the_reference_layout(tmp_path):
    cfg = tiny_llava_config()
    expected, projector = _reference_folder(tmp_path, cfg)
    lora, params = peft_io.read_peft(str(tmp_path), cfg)
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (RANK, 4.0, 0.05, ("q", "down"))
    layers = params["language_model"]["layers"]
    for (name, i), (a, b) in expected.items():
        parent, attr = name.split(".")
        np.testing.assert_array_equal(layers[parent][attr]["lora_a"][i], a)
        np.testing.assert_array_equal(layers[parent][attr]["lora_b"][i], b)
    np.testing.assert_array_equal(params["projector"]["linear_2"]["kernel"],
                                  projector["base_model.model.model.mm_projector.2.weight"].numpy().T)
    np.testing.assert_array_equal(params["projector"]["linear_1"]["bias"],
                                  projector["base_model.model.model.mm_projector.0.bias"].numpy())


@pytest.mark.parametrize("kind, says", [
    ("unknown_key", "unknown key 'base_model.model.model.layers.0.self_attn.rotary.inv_freq'"),
    ("bad_shape", r"q_proj.lora_A of layer 0 has shape \(2, 65\)"),
    ("missing_layer", r"lacks lora_A of q_proj for layers \[1\]"),
    ("too_many_layers", "is for layer 5, the model has 2"),
])
def test_bad_adapters_name_the_key(tmp_path, kind, says):
    cfg = tiny_llava_config()
    extra = {"unknown_key": {"base_model.model.model.layers.0.self_attn.rotary.inv_freq": torch.zeros(4)},
             "too_many_layers": {"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight":
                                 torch.zeros(RANK, 64)}}.get(kind)
    _reference_folder(tmp_path, cfg, extra=extra, bad_shape=kind == "bad_shape",
                      drop_layer=1 if kind == "missing_layer" else None)
    with pytest.raises(peft_io.AdapterError, match=says):
        peft_io.read_peft(str(tmp_path), cfg)


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(peft_io.AdapterError, match="neither a peft adapter folder"):
        peft_io.read_adapter(str(tmp_path), tiny_llava_config())
