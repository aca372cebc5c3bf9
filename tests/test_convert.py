"""Converters: HF (llava-hf / CLIP + LLaMA + original projector) <-> llava-jax model folders.

Random tiny fp32 weights; the converted model is checked tensor by tensor and by logits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from llava_jax import checkpoint
from llava_jax.hf.files import HFTensors, SafetensorsFile
from llava_jax.hf.keys import hf_keys
from llava_jax.hf.weights import fresh_projector, load_clip_llm, load_hf_llava, write_hf_llava
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.hf_reference import canonical_state_dict, hf_llava, nhwc_to_nchw, to_torch
from llava_jax.testing.tokenizer import save_llama_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_llava_config()


def _run_script(name: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join("convert", name), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _script_main(name: str, *args) -> int:
    """Run a convert/ script's main() in this process (faster than a subprocess)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"convert_{name[:-3]}", os.path.join(REPO, "convert", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    t = CFG.num_image_tokens
    ids = rng.integers(3, CFG.image_token_id, size=(1, 12)).astype(np.int32)
    ids[0, 0] = 1
    ids[0, 2:2 + t] = CFG.image_token_id
    pixels = rng.normal(size=(1, CFG.vision.image_size, CFG.vision.image_size, 3)).astype(np.float32)
    return ids, pixels


def _hf_logits(model, ids, pixels) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=to_torch(ids).long(), pixel_values=nhwc_to_nchw(pixels))
    return out.logits.numpy()


def _flat(params: dict, prefix="") -> dict:
    out = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        out.update(_flat(v, name + ".") if isinstance(v, dict) else {name: np.asarray(v)})
    return out


def _assert_same_params(a: dict, b: dict):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def _write_folder(folder, tensors: dict, config_dict: dict):
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_dict, f)
    return str(folder)


@pytest.fixture(scope="module")
def hf_model():
    return hf_llava(CFG, seed=1)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_hf")
    hf_model.save_pretrained(folder)
    save_llama_tokenizer(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def reference_params(hf_dir):
    """Parameters converted from the single-file, canonical-layout folder."""
    return load_hf_llava(hf_dir, progress=False)[1]


def test_round_trip_scripts_bitwise_and_logits(hf_model, hf_dir, tmp_path):
    """python convert/hf_to_orbax.py then convert/orbax_to_hf.py: identical tensors, identical logits;
    our model loaded from the folder matches transformers."""
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    r = _run_script("hf_to_orbax.py", "--hf-llava", hf_dir, "--out", ckpt)
    assert r.returncode == 0, r.stderr
    assert {"config.json", "params", "tokenizer.json"} <= set(os.listdir(ckpt))
    r = _run_script("orbax_to_hf.py", "--ckpt", ckpt, "--out", back)
    assert r.returncode == 0, r.stderr

    original = HFTensors([hf_dir])
    exported = HFTensors([str(back)])
    assert exported.keys() == original.keys()
    for key in original.keys():
        a, b = original.get(key), exported.get(key)
        assert a.dtype == b.dtype and np.array_equal(a, b), key

    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(back, attn_implementation="eager").eval()
    ids, pixels = _inputs()
    expected = _hf_logits(hf_model, ids, pixels)
    np.testing.assert_array_equal(_hf_logits(reloaded, ids, pixels), expected)
    assert transformers.AutoTokenizer.from_pretrained(back).encode("what is shown") == \
        transformers.AutoTokenizer.from_pretrained(hf_dir).encode("what is shown")

    ours, config = checkpoint.load_pretrained(str(ckpt))
    assert config == CFG.replace(remat_policy=config.remat_policy)
    np.testing.assert_allclose(np.asarray(ours(ids, pixels)), expected, atol=1e-4, rtol=1e-4)


def test_sharded_safetensors_with_index(hf_model, reference_params, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    _assert_same_params(load_hf_llava(str(tmp_path), progress=False)[1], reference_params)


def test_export_shards_big_models_with_an_index(reference_params, tmp_path):
    names = write_hf_llava(reference_params, CFG, str(tmp_path), max_shard_bytes=60_000, progress=False)
    assert len(names) > 1 and all(os.path.isfile(tmp_path / n) for n in names)
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(names)
    assert set(index["weight_map"]) == set(hf_keys(CFG))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    ids, pixels = _inputs(1)
    assert np.isfinite(_hf_logits(model, ids, pixels)).all()
    _assert_same_params(load_hf_llava(str(tmp_path), progress=False)[1], reference_params)


_OLD_LAYOUT = {"vision_tower.": "vision_tower.vision_model."}  # transformers 4.x llava-hf files
_IN_MEMORY = {"vision_tower.": "model.vision_tower.", "language_model.model.": "model.language_model.",
              "language_model.lm_head.": "lm_head.", "multi_modal_projector.": "model.multi_modal_projector."}


@pytest.mark.parametrize("layout", [_OLD_LAYOUT, _IN_MEMORY], ids=["old_vision_model", "in_memory"])
def test_other_llava_key_layouts(hf_model, hf_dir, reference_params, tmp_path, layout):
    def rename(key):
        for old, new in layout.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key

    tensors = {rename(k): v for k, v in canonical_state_dict(hf_model).items()}
    tensors["vision_tower.vision_model.embeddings.position_ids" if layout is _OLD_LAYOUT
            else "model.vision_tower.embeddings.position_ids"] = np.arange(5)[None]  # old buffer, ignored
    with open(os.path.join(hf_dir, "config.json")) as f:
        folder = _write_folder(tmp_path, tensors, json.load(f))
    _assert_same_params(load_hf_llava(folder, progress=False)[1], reference_params)


def test_pytorch_bin_and_bfloat16(hf_model, hf_dir, reference_params, tmp_path):
    """pytorch_model.bin goes through torch; bfloat16 safetensors are read without torch."""
    state = {k: torch.from_numpy(v) for k, v in canonical_state_dict(hf_model).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open(os.path.join(hf_dir, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _assert_same_params(load_hf_llava(str(tmp_path), progress=False)[1], reference_params)

    from safetensors.torch import save_file as save_torch

    x = torch.randn(3, 5).to(torch.bfloat16)
    save_torch({"w": x}, str(tmp_path / "bf16.safetensors"))
    got = SafetensorsFile(str(tmp_path / "bf16.safetensors")).get("w")
    np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())


def _original_llava_files(hf_model, root, projector_type="mlp2x_gelu"):
    """CLIP repo (vision_model.* + a text model), LLaMA repo (model.*, lm_head.weight) and
    mm_projector.bin (model.mm_projector.{0,2}.*), all in the original naming."""
    canon = canonical_state_dict(hf_model)
    vision_cfg = hf_model.config.vision_config.to_dict()
    clip_cfg = transformers.CLIPConfig(
        vision_config=vision_cfg,
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    clip = transformers.CLIPModel(clip_cfg)
    vision = {k[len("vision_tower."):]: torch.from_numpy(v) for k, v in canon.items() if k.startswith("vision_tower.")}
    clip.vision_model.load_state_dict(vision)
    clip.save_pretrained(root / "clip")

    llama = transformers.LlamaForCausalLM(hf_model.config.text_config)
    llama.load_state_dict({k[len("language_model."):]: torch.from_numpy(v) for k, v in canon.items()
                           if k.startswith("language_model.")})
    llama.save_pretrained(root / "llm")

    if projector_type == "linear":
        projector = {"model.mm_projector.weight": torch.from_numpy(canon["multi_modal_projector.linear_1.weight"]),
                     "model.mm_projector.bias": torch.from_numpy(canon["multi_modal_projector.linear_1.bias"])}
    else:
        projector = {f"model.mm_projector.{2 * (i - 1)}.{kind}":
                     torch.from_numpy(canon[f"multi_modal_projector.linear_{i}.{kind}"])
                     for i in (1, 2) for kind in ("weight", "bias")}
    torch.save(projector, root / "mm_projector.bin")
    return root / "clip", root / "llm", root / "mm_projector.bin"


def test_clip_llama_and_original_projector(hf_model, reference_params, tmp_path):
    clip, llm, projector = _original_llava_files(hf_model, tmp_path)
    keys = HFTensors([str(clip)]).keys()
    assert "vision_tower.embeddings.class_embedding" in keys and not any("text" in k for k in keys)
    out = tmp_path / "ckpt"
    r = _run_script("hf_to_orbax.py", "--clip", clip, "--llm", llm, "--projector", projector, "--out", out)
    assert r.returncode == 0, r.stderr
    config = checkpoint.read_config(str(out))
    assert config.image_token_id == CFG.text.vocab_size  # first id past the LLM's vocabulary
    assert config.replace(image_token_id=CFG.image_token_id, remat_policy=CFG.remat_policy) == CFG
    _assert_same_params(checkpoint.load_params_numpy(str(out)), reference_params)


def test_linear_projector_and_fresh_projector(hf_model, reference_params, tmp_path):
    """The v1 linear projector (mm_projector.weight) converts; without a projector one is initialised."""
    canon = canonical_state_dict(hf_model)
    weight = np.random.default_rng(0).normal(size=(CFG.text.hidden_size, CFG.vision.hidden_size)).astype(np.float32)
    torch.save({"model.mm_projector.weight": torch.from_numpy(weight),
                "model.mm_projector.bias": torch.zeros(CFG.text.hidden_size)}, tmp_path / "linear.bin")
    clip, llm, _ = _original_llava_files(hf_model, tmp_path)
    config, params = load_clip_llm(str(clip), str(llm), projector=str(tmp_path / "linear.bin"),
                                   projector_type="linear", progress=False)
    assert config.projector_type == "linear" and set(params["projector"]) == {"linear_1"}
    np.testing.assert_array_equal(params["projector"]["linear_1"]["kernel"], weight.T)
    _assert_same_params(params["language_model"], reference_params["language_model"])

    config, params = load_clip_llm(str(clip), str(llm), progress=False)
    kernel = params["projector"]["linear_2"]["kernel"]
    assert kernel.shape == (CFG.text.hidden_size, CFG.text.hidden_size) and np.std(kernel) > 0
    assert not np.array_equal(kernel, canon["multi_modal_projector.linear_2.weight"].T)


# ----- errors ------------------------------------------------------------------------------------

def _edited_folder(hf_model, hf_dir, tmp_path, edit):
    tensors = canonical_state_dict(hf_model)
    edit(tensors)
    with open(os.path.join(hf_dir, "config.json")) as f:
        return _write_folder(tmp_path, tensors, json.load(f))


def test_missing_key_is_named(hf_model, hf_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    folder = _edited_folder(hf_model, hf_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"missing key\(s\) \[" + key.replace(".", r"\.")):
        load_hf_llava(folder, progress=False)


def test_unexpected_key_is_named(hf_model, hf_dir, tmp_path, capsys):
    key = "language_model.model.layers.0.self_attn.q_proj.bias"
    folder = _edited_folder(hf_model, hf_dir, tmp_path, lambda t: t.update({key: np.zeros(64, np.float32)}))
    assert _script_main("hf_to_orbax.py", "--hf-llava", folder, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "unexpected key(s)" in err and key in err and "model.safetensors" in err


def test_shape_mismatch_names_key_expected_and_found(hf_model, hf_dir, tmp_path):
    key = "multi_modal_projector.linear_1.weight"
    folder = _edited_folder(hf_model, hf_dir, tmp_path, lambda t: t.update({key: np.zeros((64, 16), np.float32)}))
    with pytest.raises(ValueError, match=r"shape mismatch for multi_modal_projector\.linear_1\.weight .*"
                                         r"expected \(64, 32\), found \(64, 16\)"):
        load_hf_llava(folder, progress=False)


def test_unknown_projector_type_in_conversion(hf_model, tmp_path, capsys):
    clip, llm, projector = _original_llava_files(hf_model, tmp_path)
    rc = _script_main("hf_to_orbax.py", "--clip", clip, "--llm", llm, "--projector", projector,
                      "--projector-type", "mlp2x_relu", "--out", tmp_path / "out")
    assert rc == 1 and "unknown projector type 'mlp2x_relu'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_projector_file_of_wrong_type_is_reported(hf_model, tmp_path):
    clip, llm, projector = _original_llava_files(hf_model, tmp_path)
    with pytest.raises(ValueError, match=r"mm_projector\.bin \(type linear\): unexpected key\(s\) "
                                         r"\[multi_modal_projector\.linear_2\.bias \('model\.mm_projector\.2\.bias'"):
        load_clip_llm(str(clip), str(llm), projector=str(projector), projector_type="linear", progress=False)


def test_export_of_non_llava_hf_projector_fails_clearly(reference_params, tmp_path, capsys):
    config = tiny_llava_config(projector_type="linear")
    params = dict(reference_params)
    params["projector"] = fresh_projector(config)
    checkpoint.save_model(str(tmp_path / "ckpt"), params, config)
    assert _script_main("orbax_to_hf.py", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "hf") == 1
    assert "projector 'linear' has no llava-hf equivalent" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")


def test_export_pads_a_vocabulary_without_the_placeholder(reference_params, tmp_path):
    """Original-code configs put <image> just past the vocabulary; the export grows the vocabulary to
    the next multiple of 64 (32000 -> 32064 in llava-hf) and the real tokens' logits are unchanged."""
    config = CFG.replace(image_token_id=CFG.text.vocab_size)
    write_hf_llava(reference_params, config, str(tmp_path), progress=False)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.text_config.vocab_size == 192 and hf.config.image_token_id == 128
    ids, pixels = _inputs(2)
    ids[ids == CFG.image_token_id] = config.image_token_id
    ours = checkpoint.model_from_params(config, reference_params)
    got = _hf_logits(hf, ids, pixels)
    np.testing.assert_allclose(got[..., :128], np.asarray(ours(ids, pixels)), atol=1e-4, rtol=1e-4)
    embed = hf.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(embed[128:], np.broadcast_to(embed[:128].mean(0), (64, embed.shape[1])), atol=1e-6)


def test_a_folder_without_config_json_is_named_in_one_line(tmp_path, capsys):
    """Not transformers' traceback: the folder exists, but is not a HF model folder."""
    (tmp_path / "clip").mkdir()
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    assert _script_main("hf_to_orbax.py", "--hf-llava", tmp_path / "clip", "--out", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip() == f"hf_to_orbax: no config.json in {tmp_path / 'clip'}"
    assert _script_main("hf_to_orbax.py", "--clip", tmp_path / "clip", "--llm", tmp_path / "llm",
                        "--out", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip() == f"hf_to_orbax: no config.json in {tmp_path / 'clip'}"
    assert not (tmp_path / "out").exists()
