"""LLaVA-1.6: the v1.6 configs against transformers' models on the meta device, a Mistral decoder
through our LLaMA decoder, and llava-hf v1.6 folders converted both ways (exact round trip,
transformers loads the export)."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import transformers

from llava_jax import checkpoint
from llava_jax.config_files import load_config
from llava_jax.data import anyres
from llava_jax.hf.configs import from_hf, to_hf
from llava_jax.hf.files import HFTensors
from llava_jax.hf.keys import load_into_model
from llava_jax.hf.weights import load_hf_llava
from llava_jax.info import parameter_counts
from llava_jax.models.config import config_from_any
from llava_jax.testing import hf_reference as R
from llava_jax.testing.tokenizer import save_llama_tokenizer
from test_llava_next import TILE, PINPOINTS, _photos, canonical, next_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V16 = ["vicuna_7b", "vicuna_13b", "mistral_7b", "34b"]


def _hf_config(d: dict):
    """transformers' config object for our to_hf dict (llava or llava_next)."""
    return transformers.AutoConfig.for_model(**d)


@pytest.mark.parametrize("name", V16)
def test_v1_6_configs_count_what_transformers_builds(name):
    model = config_from_any(load_config(os.path.join(REPO, "configs", f"llava_v1_6_{name}.py")).model)
    stage1 = load_config(os.path.join(REPO, "configs", f"llava_v1_6_{name}.py:stage1"))
    assert stage1.stage == 1 and stage1.data.template == "plain"
    hf_cfg = _hf_config(to_hf(model))
    assert type(hf_cfg).__name__ == "LlavaNextConfig"
    with torch.device("meta"):
        hf = transformers.LlavaNextForConditionalGeneration(hf_cfg)
    assert parameter_counts(model)["total"] == sum(p.numel() for p in hf.parameters())
    assert model.image_grid_pinpoints == anyres.DEFAULT_GRID_PINPOINTS
    t = model.text
    expected = {"vicuna_7b": ("llama", 10000.0, 32, 32064), "vicuna_13b": ("llama", 10000.0, 40, 32064),
                "mistral_7b": ("mistral", 1e6, 8, 32064), "34b": ("llama", 5e6, 8, 64064)}[name]
    assert (t.hf_model_type, t.rope_theta, t.num_kv_heads, t.vocab_size) == expected
    assert type(hf_cfg.text_config).__name__ == ("MistralConfig" if name == "mistral_7b" else "LlamaConfig")
    assert from_hf(hf_cfg.to_dict()) == model.replace(dtype="float32", remat_policy="nothing_saveable")


def test_mistral_decoder_equals_transformers():
    """Mistral without a sliding window is our LLaMA decoder (rope_theta 1e6, GQA)."""
    cfg = next_config()
    text = cfg.text.__class__(**{**cfg.text.__dict__, "rope_theta": 1e6, "hf_model_type": "mistral"})
    cfg = cfg.replace(text=text)
    d = to_hf(cfg)["text_config"]
    hf_cfg = transformers.MistralConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert hf_cfg.sliding_window is None and hf_cfg.rope_parameters["rope_theta"] == 1e6
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = R._randomize(transformers.MistralForCausalLM(hf_cfg), 0, 0.1)
    tensors = {("language_model.model." + k[len("model."):] if k.startswith("model.") else "language_model." + k):
               v.detach().numpy() for k, v in hf.state_dict().items()}
    from flax import nnx

    from llava_jax.models.llama import LlamaModel

    ours = nnx.eval_shape(lambda: LlamaModel(cfg.text, dtype="float32", remat_policy="none", rngs=nnx.Rngs(0)))
    load_into_model(ours, tensors, cfg, component="language_model")
    ids = np.random.default_rng(0).integers(1, 120, size=(2, 40)).astype(np.int32)
    with torch.no_grad():
        ref = hf(input_ids=R.to_torch(ids, torch.long)).logits.numpy()
    got = R.jitted(ours)(ids)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)


def test_sliding_window_is_refused():
    d = to_hf(next_config())
    d["text_config"] = dict(d["text_config"], model_type="mistral", sliding_window=16, max_position_embeddings=256)
    with pytest.raises(ValueError, match="sliding_window=16: sliding-window attention is not supported"):
        from_hf(d)


def _script_main(name: str, *args) -> int:
    spec = importlib.util.spec_from_file_location(f"convert_{name[:-3]}", os.path.join(REPO, "convert", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def _mistral_next_config():
    cfg = next_config()
    return cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "rope_theta": 1e6, "hf_model_type": "mistral"}))


@pytest.fixture(scope="module")
def hf_next():
    hf_cfg = _hf_config(to_hf(_mistral_next_config()))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    return R._randomize(transformers.LlavaNextForConditionalGeneration(hf_cfg), 3, 0.1)


def test_llava_hf_v1_6_round_trip(hf_next, tmp_path):
    """llava-hf v1.6 folder (Mistral decoder) -> ours -> llava-hf: identical tensors and config,
    transformers loads the export, and our loaded model gives transformers' logits."""
    cfg, hf = _mistral_next_config(), hf_next
    src, ckpt, back = tmp_path / "src", tmp_path / "ckpt", tmp_path / "back"
    hf.save_pretrained(src)
    save_llama_tokenizer(str(src))
    assert _script_main("hf_to_orbax.py", "--hf-llava", src, "--out", ckpt) == 0
    assert _script_main("orbax_to_hf.py", "--ckpt", ckpt, "--out", back) == 0

    original, exported = HFTensors([str(src)]), HFTensors([str(back)])
    assert "image_newline" in exported.keys() and exported.keys() == original.keys()
    for key in original.keys():
        a, b = original.get(key), exported.get(key)
        assert a.dtype == b.dtype and np.array_equal(a, b), key

    reloaded = transformers.LlavaNextForConditionalGeneration.from_pretrained(back, attn_implementation="eager")
    assert reloaded.config.text_config.model_type == "mistral"
    for key, value in canonical(reloaded).items():
        np.testing.assert_array_equal(value, canonical(hf)[key], err_msg=key)

    ours, config = checkpoint.load_pretrained(str(ckpt))
    assert config == cfg.replace(remat_policy=config.remat_policy)
    photo = _photos()[3]
    pixels, size = anyres.preprocess_anyres(photo, PINPOINTS, size=TILE)
    n = anyres.num_image_tokens(size, PINPOINTS, TILE, cfg.vision.patch_size)
    ids = np.array([[1, 5] + [cfg.image_token_id] * n + [6, 7]], np.int32)
    with torch.no_grad():
        ref = reloaded.eval()(input_ids=R.to_torch(ids, torch.long),
                              pixel_values=R.to_torch(pixels[None].transpose(0, 1, 4, 2, 3)),
                              image_sizes=torch.tensor([size])).logits.numpy()
    got = ours(ids, pixels[None], image_sizes=np.array([size]))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)


def _component_folders(hf, root, original_next: bool):
    """A CLIP folder and a Mistral folder from the llava-hf model's weights; with `original_next` the
    Mistral folder is an original LLaVA-1.6 checkpoint (mm_projector, image_newline, anyres config)."""
    from safetensors.numpy import save_file

    canon = canonical(hf)
    clip = transformers.CLIPVisionModel(hf.config.vision_config)
    clip.load_state_dict({k[len("vision_tower."):]: torch.from_numpy(v) for k, v in canon.items()
                          if k.startswith("vision_tower.")})
    clip.save_pretrained(root / "clip")
    llm = {k[len("language_model."):]: v for k, v in canon.items() if k.startswith("language_model.")}
    text = hf.config.text_config.to_dict()
    projector = {f"model.mm_projector.{2 * (i - 1)}.{kind}": canon[f"multi_modal_projector.linear_{i}.{kind}"]
                 for i in (1, 2) for kind in ("weight", "bias")}
    if original_next:
        llm.update(projector)
        llm["model.image_newline"] = canon["image_newline"]
        text.update(image_aspect_ratio="anyres", image_grid_pinpoints=[list(p) for p in PINPOINTS],
                    mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu")
    os.makedirs(root / "llm")
    save_file({k: np.ascontiguousarray(v) for k, v in llm.items()}, str(root / "llm" / "model.safetensors"))
    with open(root / "llm" / "config.json", "w") as f:
        json.dump(text, f)
    save_file(projector, str(root / "mm_projector.safetensors"))
    return root / "clip", root / "llm", root / "mm_projector.safetensors"


def test_original_llava_1_6_components(hf_next, tmp_path):
    """An original LLaVA-1.6 folder (image_aspect_ratio 'anyres', model.image_newline) converts as is;
    a plain Mistral folder + a stage-1 projector with --anyres gets a fresh image_newline."""
    cfg = _mistral_next_config()
    reference = load_hf_llava(_saved(hf_next, tmp_path / "hf"), progress=False)[1]
    clip, llm, projector = _component_folders(hf_next, tmp_path / "orig", original_next=True)
    assert _script_main("hf_to_orbax.py", "--clip", clip, "--llm", llm, "--out", tmp_path / "a") == 0
    config = checkpoint.read_config(str(tmp_path / "a"))
    assert config.anyres and config.text.hf_model_type == "mistral"
    assert config.replace(image_token_id=cfg.image_token_id, remat_policy=cfg.remat_policy) == cfg
    got = checkpoint.load_params_numpy(str(tmp_path / "a"))
    for path in (("projector", "image_newline"), ("projector", "linear_2", "kernel"),
                 ("language_model", "embed_tokens", "embedding")):
        a, b = got, reference
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=".".join(path))

    clip, llm, projector = _component_folders(hf_next, tmp_path / "plain", original_next=False)
    assert _script_main("hf_to_orbax.py", "--clip", clip, "--llm", llm, "--projector", projector, "--anyres",
                        "--out", tmp_path / "b") == 0
    config = checkpoint.read_config(str(tmp_path / "b"))
    assert config.image_grid_pinpoints == anyres.DEFAULT_GRID_PINPOINTS
    got = checkpoint.load_params_numpy(str(tmp_path / "b"))["projector"]
    np.testing.assert_array_equal(np.asarray(got["linear_1"]["kernel"]), reference["projector"]["linear_1"]["kernel"])
    newline = np.asarray(got["image_newline"])
    assert newline.shape == (cfg.text.hidden_size,)
    assert not np.array_equal(newline, reference["projector"]["image_newline"])  # fresh, not the trained one


def _saved(hf, folder):
    hf.save_pretrained(folder)
    return str(folder)
