"""HuggingFace PyTorch weight files: read them tensor by tensor under canonical llava-hf names
(llava_jax.hf.keys.canonical_key), and write safetensors (sharded, with an index).

Files: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and PyTorch
`.bin` files (read through torch, which must then be installed).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import numpy as np

from llava_jax.hf.keys import canonical_key

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILE_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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
