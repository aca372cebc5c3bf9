"""Random-access record sources: LLaVA JSON/JSONL + image folder, ArrayRecord shards, mixtures, and
the built-in synthetic dataset (llava_jax.data.synthetic.SyntheticSource, importable from here).

Every source has `len()` and `source[i] -> record`, the protocol Grain reads; llava_jax.data.records
says what a record holds (and read_llava_json / raw_to_record, importable from here too, live there).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from llava_jax.data.records import example_to_record, find_dataset_dir, raw_to_record, read_llava_json
from llava_jax.data.synthetic import SyntheticSource  # noqa: F401  (the `synthetic` data.source)


class JsonSource:
    """LLaVA JSON/JSONL + image folder, held in memory (as the reference does)."""

    def __init__(self, json_path: str, image_folder: str = ""):
        self.json_path = json_path
        self.image_folder = image_folder
        self._entries = read_llava_json(json_path)
        self._name = os.path.basename(json_path)

    def __len__(self):
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        return raw_to_record(self._entries[index], f"{self._name}#{index}", self.image_folder)

    def __repr__(self):
        return f"JsonSource({self.json_path!r}, {len(self)} records)"


class MixtureSource:
    """Several sources as one. `weights[i]` is how many passes over source i one pass over the mixture
    makes: 1 = every record once, 2 = twice, 0.5 = a fixed random half (seeded), and so on."""

    def __init__(self, sources: Sequence, weights: Optional[Sequence[float]] = None, seed: int = 0):
        weights = [1.0] * len(sources) if not weights else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} mixture weights for {len(sources)} sources")
        if any(w < 0 for w in weights):
            raise ValueError(f"mixture weights must be >= 0, found {weights}")
        self.sources = list(sources)
        rng = np.random.default_rng(seed)
        parts = []
        for s, (source, w) in enumerate(zip(self.sources, weights)):
            n = len(source)
            count = int(round(w * n))
            whole, rest = divmod(count, n) if n else (0, 0)
            local = np.concatenate([np.tile(np.arange(n), whole), rng.permutation(n)[:rest]]).astype(np.int64)
            parts.append(np.stack([np.full_like(local, s), local], axis=1))
        self._index = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)

    def __len__(self):
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        s, local = self._index[index]
        return self.sources[int(s)][int(local)]


def json_mixture(json_paths: str, image_folder: str = "", weights: str = "", seed: int = 0):
    """config.data.json_path / weights (comma-separated) -> a JsonSource or a MixtureSource."""
    paths = [p.strip() for p in str(json_paths).split(",") if p.strip()]
    if not paths:
        raise ValueError("data.json_path is empty; set it to a LLaVA JSON/JSONL file (comma-separated for a mixture)")
    sources = [JsonSource(p, image_folder) for p in paths]
    w = [float(x) for x in str(weights).split(",") if x.strip()] if weights else None
    if len(sources) == 1 and not w:
        return sources[0]
    return MixtureSource(sources, w, seed=seed)


class ArrayRecordSource:
    """Records written by `llava-jax data prepare` (llava_jax.data.tfds_builder), read back with
    TFDS's `as_data_source()` (random access, no TensorFlow)."""

    def __init__(self, directory: str, split: str = "train"):
        import tensorflow_datasets as tfds

        self.directory = find_dataset_dir(directory)
        self.split = split
        builder = tfds.builder_from_directory(self.directory)
        sources = builder.as_data_source()
        if split not in sources:
            raise ValueError(f"{self.directory} has no split {split!r}; found {sorted(sources)}")
        self._source = sources[split]

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return example_to_record(self._source[index])

    def __repr__(self):
        return f"ArrayRecordSource({self.directory!r}, split={self.split!r}, {len(self)} records)"
