"""HuggingFace PyTorch weights on disk: read them tensor by tensor, under canonical llava-hf names.

Every layout the reference produced is renamed to the llava-hf save format of transformers 5
(`language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.linear_{i}.*`,
`vision_tower.*`), the names llava_jax.models.hf_mapping is written against:

- older llava-hf files: `vision_tower.vision_model.*`
- in-memory transformers names: `model.language_model.*`, `model.vision_tower.*`,
  `model.multi_modal_projector.*`, `lm_head.weight`
- a CLIP repo: `vision_model.*` (CLIPModel, CLIPVisionModelWithProjection: the text model and the
  contrastive heads are ignored), or bare `embeddings.*`, `encoder.layers.*`, `pre_layrnorm.*`,
  `post_layernorm.*` (CLIPVisionModel saved by transformers 5)
- a LLaMA/Vicuna repo: `model.*`, `lm_head.weight`
- original LLaVA projectors: `model.mm_projector.{0,2,...}.*` or `mm_projector.{0,2,...}.*`
  (Sequential of Linear/GELU: Linear k sits at index 2(k-1)) and `mm_projector.{weight,bias}` (linear)

Files: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and PyTorch
`.bin` files (read through torch, which must then be installed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Iterable, Optional

import jax
import numpy as np

# (pattern, replacement), first match wins; applied to the key as stored in the file.
_RENAMES = [
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "vision_tower."),  # original LLaVA
    (re.compile(r"^model\.vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^vision_model\."), "vision_tower."),
    # CLIPVisionModel as transformers 5 saves it: the vision_model's keys with no prefix
    (re.compile(r"^(?=(?:embeddings|encoder|pre_layrnorm|post_layernorm)\.)"), "vision_tower."),
    (re.compile(r"^lm_head\.weight$"), "language_model.lm_head.weight"),
    (re.compile(r"^model\.image_newline$"), "image_newline"),  # LlavaNext in memory
]
_MM_PROJECTOR = re.compile(r"^(?:model\.)?mm_projector\.(?:(\d+)\.)?(weight|bias)$")
_LLAMA = re.compile(r"^model\.")

# Keys that carry no parameter of ours: CLIP's text side and heads, non-persistent buffers.
_IGNORED = re.compile(
    r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)"
    r"|\.position_ids$|\.rotary_emb\.inv_freq$")

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILE_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def canonical_key(key: str) -> Optional[str]:
    """The llava-hf name of a stored key, or None for a key that holds nothing we load."""
    if _IGNORED.search(key):
        return None
    m = _MM_PROJECTOR.match(key)
    if m:
        index, kind = m.groups()
        if index is None:  # mm_projector_type 'linear': a bare nn.Linear
            return f"multi_modal_projector.linear_1.{kind}"
        if int(index) % 2:  # odd entries of the Sequential are GELUs, which hold no weights
            return key
        return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{kind}"
    for pattern, replacement in _RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    if _LLAMA.search(key):
        return "language_model." + key
    return key


# ----- single files --------------------------------------------------------------------------

class SafetensorsFile:
    """One .safetensors file, read lazily; bfloat16 tensors come back as ml_dtypes.bfloat16."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, framework="numpy")
        self._header = None

    def keys(self) -> list:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        if self._file.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16: read the bytes
            return self._read_raw_bf16(key)
        return self._file.get_tensor(key)

    def _read_raw_bf16(self, key: str) -> np.ndarray:
        import ml_dtypes

        if self._header is None:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._header = (8 + size, json.loads(f.read(size)))
        start, header = self._header
        info = header[key]
        begin, end = info["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(start + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


class TorchBinFile:
    """One PyTorch .bin state dict (torch.load with mmap, weights only)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path} is a PyTorch .bin file; reading it needs torch "
                              "(pip install torch), or convert it to .safetensors first") from e
        self.path = path
        self._torch = torch
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            self._tensors = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self._tensors, dict):
            raise ValueError(f"{path} holds a {type(self._tensors).__name__}, expected a state dict")

    def keys(self) -> list:
        return list(self._tensors)

    def shape(self, key: str) -> tuple:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key].detach()
        if t.dtype == self._torch.bfloat16:
            import ml_dtypes

            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def open_weight_file(path: str):
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return TorchBinFile(path)
    raise ValueError(f"{path}: unknown weight file type; expected .safetensors or .bin")


def weight_files(path: str) -> list:
    """The weight files of a folder (index first, then single files), or [path] for a file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no weights at {path!r}: not a file or folder")
    for name in INDEX_FILE_NAMES:
        index = os.path.join(path, name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that are not in the folder: {missing}")
            return [os.path.join(path, f) for f in files]
    for name in WEIGHT_FILE_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if found:
        safetensors = [f for f in found if f.endswith(".safetensors")]
        return [os.path.join(path, f) for f in (safetensors or found)]
    raise FileNotFoundError(f"no weight files in {path!r}: expected model.safetensors, "
                            "model.safetensors.index.json with shards, or pytorch_model.bin")


# ----- a set of files under canonical names --------------------------------------------------

class HFTensors:
    """Tensors from one or more weight files (or folders), addressed by canonical llava-hf names."""

    def __init__(self, paths: Iterable[str]):
        self._where = {}   # canonical name -> (file reader, stored key)
        self._readers = []
        for path in paths:
            for file in weight_files(path):
                reader = open_weight_file(file)
                self._readers.append(reader)
                for key in reader.keys():
                    name = canonical_key(key)
                    if name is None:
                        continue
                    if name in self._where:
                        other, other_key = self._where[name]
                        raise ValueError(f"two tensors map to {name!r}: {other_key!r} in {other.path} "
                                         f"and {key!r} in {file}")
                    self._where[name] = (reader, key)

    def keys(self) -> list:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def source(self, name: str) -> str:
        reader, key = self._where[name]
        return f"{key!r} in {reader.path}"

    def shape(self, name: str) -> tuple:
        reader, key = self._where[name]
        return reader.shape(key)

    def get(self, name: str) -> np.ndarray:
        reader, key = self._where[name]
        return reader.get(key)


# ----- writing -------------------------------------------------------------------------------

def save_safetensors(tensors: dict, path: str) -> None:
    """Write numpy tensors (bfloat16 through torch, which safetensors' numpy API cannot write)."""
    import ml_dtypes

    if any(t.dtype == ml_dtypes.bfloat16 for t in tensors.values()):
        try:
            import torch
            from safetensors.torch import save_file as save_torch
        except ImportError as e:
            raise ImportError("writing bfloat16 safetensors needs torch; use --dtype float32 or float16") from e
        converted = {k: (torch.from_numpy(np.ascontiguousarray(v).view(np.int16)).view(torch.bfloat16)
                         if v.dtype == ml_dtypes.bfloat16 else torch.from_numpy(np.ascontiguousarray(v)))
                     for k, v in tensors.items()}
        save_torch(converted, path, metadata={"format": "pt"})
        return
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


class ShardedWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, then the index.

    A single shard is named model.safetensors (no index), as transformers does.
    """

    def __init__(self, folder: str, max_shard_bytes: int = 5 * 2**30):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending, self._pending_bytes = {}, 0
        self._shards = []  # list of key lists, one per written shard
        self._total = 0
        os.makedirs(folder, exist_ok=True)

    def add(self, key: str, tensor: np.ndarray) -> None:
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor
        self._pending_bytes += tensor.nbytes
        self._total += tensor.nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        save_safetensors(self._pending, os.path.join(self.folder, f"_shard{index}.safetensors"))
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list:
        """Finish writing; returns the file names written."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        for i, name in enumerate(names):
            os.replace(os.path.join(self.folder, f"_shard{i}.safetensors"), os.path.join(self.folder, name))
        if n > 1:
            weight_map = {key: names[i] for i, keys in enumerate(self._shards) for key in keys}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)
        return names


# ----- conversion between HF files and our parameter dict ------------------------------------
# The table of parameters <-> canonical keys is llava_jax.models.hf_mapping; this part only moves
# tensors between files and that table, one tensor at a time.

def check_against_table(tensors: HFTensors, table: list, what: str, optional: Iterable[str] = ()) -> None:
    """Raise ValueError listing every missing key, unexpected key and shape mismatch (from file
    headers, before anything is converted). Keys in `optional` may be present without being used."""
    expected = {key: entry.hf_shape for entry in table for key in entry.hf_keys}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors.keys() if k not in expected and k not in set(optional)]
    problems = []
    if missing:
        problems.append(f"missing key(s) {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_few([f'{k} ({tensors.source(k)})' for k in unexpected])}")
    for key, shape in expected.items():
        if key in tensors and tuple(tensors.shape(key)) != tuple(shape):
            problems.append(f"shape mismatch for {key} ({tensors.source(key)}): expected {tuple(shape)}, "
                            f"found {tuple(tensors.shape(key))}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _few(items: list, n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


def params_from_tensors(tensors: HFTensors, table: list, progress: bool = True) -> dict:
    """Our nested float32 parameter dict, each stacked array filled layer by layer."""
    from tqdm import tqdm

    params: dict = {}
    total = sum(len(e.hf_keys) for e in table)
    with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
        for entry in table:
            out = np.empty(entry.shape, np.float32)
            if entry.stacked:
                for i, key in enumerate(entry.hf_keys):
                    one = dataclasses.replace(entry, hf_keys=(key,), stacked=False)
                    out[i] = one.to_ours([tensors.get(key)])
                    bar.update()
            else:
                out[...] = entry.to_ours([tensors.get(entry.hf_keys[0])])
                bar.update()
            node = params
            for p in entry.path[:-1]:
                node = node.setdefault(p, {})
            node[entry.path[-1]] = out
    return params


def _tied_head(config) -> tuple:
    # a tied model has no lm_head parameter; a file may still carry the (identical) tensor
    return ("language_model.lm_head.weight",) if config.text.tie_word_embeddings else ()


def hf_llava_config(folder: str):
    """Our LlavaConfig from a llava-hf folder's config.json (transformers fills omitted defaults)."""
    import transformers

    from llava_jax.models.config import from_hf

    _raw_config(folder)  # a folder without config.json: said here, not in transformers' traceback
    hf = transformers.AutoConfig.from_pretrained(folder)
    if hf.model_type not in ("llava", "llava_next"):
        raise ValueError(f"{folder}/config.json has model_type {hf.model_type!r}; --hf-llava expects a llava-hf "
                         "folder (model_type 'llava' or 'llava_next'); use --clip/--llm for separate CLIP and "
                         "LLaMA folders")
    return from_hf(hf.to_dict())


def load_hf_llava(folder: str, progress: bool = True):
    """A llava-hf folder (single or sharded safetensors or .bin, any key layout) -> (config, params)."""
    from llava_jax.models import hf_mapping

    config = hf_llava_config(folder)
    tensors = HFTensors([folder])
    table = hf_mapping.entries(config)
    check_against_table(tensors, table, f"llava-hf weights in {folder}", optional=_tied_head(config))
    return config, params_from_tensors(tensors, table, progress)


def _raw_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(path) as f:
        return json.load(f)


def clip_llm_config(clip_dir: str, llm_dir: str, projector_type: Optional[str] = None,
                    image_token_id: Optional[int] = None, vision_feature_layer: Optional[int] = None,
                    dtype: str = "float32", image_grid_pinpoints=None):
    """Our LlavaConfig for CLIP + LLaMA folders. Settings the original LLaVA stored in the LLM's
    config.json (mm_projector_type, mm_vision_select_layer/feature, and for LLaVA-1.6
    image_grid_pinpoints with image_aspect_ratio 'anyres') are used unless given here."""
    import transformers

    from llava_jax.models.config import LlavaConfig, text_from_hf, vision_from_hf
    from llava_jax.models.projector import projector_depth

    raw = _raw_config(llm_dir)
    _raw_config(clip_dir)  # likewise for the CLIP folder
    projector_type = projector_type or raw.get("mm_projector_type") or "mlp2x_gelu"
    projector_depth(projector_type)  # ValueError naming the accepted forms
    vision = vision_from_hf(transformers.CLIPVisionConfig.from_pretrained(clip_dir).to_dict())
    # A Mistral folder keeps model_type 'mistral' (exported as such); both are read as LLaMA decoders.
    text_class = transformers.MistralConfig if raw.get("model_type") == "mistral" else transformers.LlamaConfig
    text_hf = text_class.from_pretrained(llm_dir).to_dict()
    text = text_from_hf(text_hf)
    if image_grid_pinpoints is None and raw.get("image_aspect_ratio") == "anyres":
        image_grid_pinpoints = raw.get("image_grid_pinpoints")
    strategy = {"patch": "default", "cls_patch": "full"}.get(raw.get("mm_vision_select_feature"), "default")
    layer = vision_feature_layer if vision_feature_layer is not None else raw.get("mm_vision_select_layer", -2)
    return LlavaConfig(vision=vision, text=text, projector_type=projector_type, vision_feature_layer=layer,
                       vision_feature_select_strategy=strategy,
                       # the first id past the vocabulary, like llava-hf's <image> = 32000 for LLaMA
                       image_token_id=text.vocab_size if image_token_id is None else image_token_id,
                       pad_token_id=text_hf.get("pad_token_id") or 0, dtype=dtype,
                       image_grid_pinpoints=image_grid_pinpoints)


def load_clip_llm(clip_dir: str, llm_dir: str, projector: Optional[str] = None,
                  projector_type: Optional[str] = None, image_token_id: Optional[int] = None,
                  seed: int = 0, progress: bool = True, image_grid_pinpoints=None):
    """CLIP folder + LLaMA/Vicuna folder (+ an original mm_projector.bin/.safetensors) -> (config, params).

    The projector comes from `projector`, else from the LLM folder when it holds
    model.mm_projector.* (an original LLaVA checkpoint), else it is freshly initialised (stage 1)."""
    from llava_jax.models import hf_mapping

    config = clip_llm_config(clip_dir, llm_dir, projector_type, image_token_id,
                             image_grid_pinpoints=image_grid_pinpoints)
    vision = HFTensors([clip_dir])
    table = hf_mapping.entries(config, ["vision_tower"])
    check_against_table(vision, table, f"CLIP weights in {clip_dir}")
    params = params_from_tensors(vision, table, progress)

    llm = HFTensors([llm_dir])
    projector_keys = [k for k in llm.keys() if k.startswith("multi_modal_projector.") or k == "image_newline"]
    table = hf_mapping.entries(config, ["language_model"])
    check_against_table(llm, table, f"LLaMA weights in {llm_dir}", optional=projector_keys + list(_tied_head(config)))
    params.update(params_from_tensors(llm, table, progress))

    table = hf_mapping.entries(config, ["projector"])
    if projector is not None or projector_keys:
        source = HFTensors([projector]) if projector is not None else llm
        fresh_newline = config.anyres and "image_newline" not in source
        if fresh_newline:  # a stage-1 mm_projector.bin holds no image_newline: it starts fresh
            table = [e for e in table if e.hf_keys != ("image_newline",)]
        what = f"projector weights in {projector or llm_dir} (type {config.projector_type})"
        others = [] if projector is not None else [k for k in llm.keys() if k not in projector_keys]
        check_against_table(source, table, what, optional=others)
        params.update(params_from_tensors(source, table, progress))
        if fresh_newline:
            params["projector"]["image_newline"] = fresh_projector(config, seed)["image_newline"]
    else:
        params["projector"] = fresh_projector(config, seed)
    return config, params


def fresh_projector(config, seed: int = 0) -> dict:
    """The projector's parameters as LlavaModel initialises them (the start of stage 1)."""
    from flax import nnx

    from llava_jax.models.projector import Projector

    from llava_jax.models import layers as L

    rngs = nnx.Rngs(seed)
    module = Projector(config.projector_type, config.vision_feature_dim, config.text.hidden_size,
                       dtype=config.dtype, rngs=rngs)
    if config.anyres:  # as LlavaModel builds it (models/llava.py)
        d = config.text.hidden_size
        module.image_newline = L.param(rngs, L.normal_init(d ** -0.5), (d,), ("embed",))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def pad_vocab(params: dict, config, size: int):
    """Grow the vocabulary to `size` rows: llava-hf keeps <image> (and its pad) inside the embedding
    table, while the original 32000-token LLaMA vocabulary puts the placeholder just past it.
    New embedding and lm_head rows are the mean of the existing ones (as llava-hf's conversion did),
    so their logits are ordinary rather than dominant. Returns (params, config); the input is kept."""
    vocab = config.text.vocab_size
    if size < vocab:
        raise ValueError(f"cannot pad the vocabulary from {vocab} down to {size}")
    lm = dict(params["language_model"])
    embed = np.asarray(lm["embed_tokens"]["embedding"])
    lm["embed_tokens"] = {"embedding": np.concatenate(
        [embed, np.broadcast_to(embed.mean(0, keepdims=True), (size - vocab, embed.shape[1]))])}
    if "lm_head" in lm:
        head = np.asarray(lm["lm_head"]["kernel"])
        lm["lm_head"] = {"kernel": np.concatenate(
            [head, np.broadcast_to(head.mean(1, keepdims=True), (head.shape[0], size - vocab))], axis=1)}
    config = config.replace(text=dataclasses.replace(config.text, vocab_size=size))
    return {**params, "language_model": lm}, config


def write_hf_llava(params: dict, config, out: str, dtype: str = "float32",
                   max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> list:
    """Write our parameters as a llava-hf folder (safetensors, sharded with an index when larger
    than max_shard_bytes, and config.json) that LlavaForConditionalGeneration.from_pretrained loads
    (LlavaNextForConditionalGeneration for an AnyRes config).

    A placeholder id past the vocabulary (the original-code configs) is brought inside it by padding
    the vocabulary to the next multiple of 64 (32000 -> 32064, llava-hf's size).
    Returns the weight file names."""
    import ml_dtypes
    from tqdm import tqdm

    from llava_jax.models import hf_mapping
    from llava_jax.models.config import to_hf

    hf_config = to_hf(config)  # ValueError for projectors llava-hf does not have
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected float32, float16 or bfloat16")
    params = jax.tree.map(np.asarray, params)
    needed = max(config.image_token_id, config.pad_token_id) + 1
    if needed > config.text.vocab_size:
        params, config = pad_vocab(params, config, -(-needed // 64) * 64)
        hf_config = to_hf(config)
    hf_config["dtype"] = dtype
    writer = ShardedWriter(out, max_shard_bytes)
    table = hf_mapping.entries(config)
    with tqdm(total=sum(len(e.hf_keys) for e in table), desc="exporting", unit="tensor", disable=not progress) as bar:
        for key, tensor in hf_mapping.hf_from_state(params, config):
            writer.add(key, tensor.astype(np_dtype, copy=False))
            bar.update()
    names = writer.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return names
