"""Random-access record sources: LLaVA JSON/JSONL + image folder, ArrayRecord shards, mixtures, and
a small synthetic dataset.

Every source has `len()` and `source[i] -> record`, the protocol Grain reads; llava_jax.data.records
says what a record holds (and read_llava_json / raw_to_record, importable from here too, live there).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from llava_jax.data.conversation import IMAGE_PLACEHOLDER
from llava_jax.data.records import example_to_record, find_dataset_dir, raw_to_record, read_llava_json


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


# ----- the built-in synthetic dataset -----------------------------------------------------------

_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
            "white": (250, 250, 250), "black": (15, 15, 15)}
_PLACES = ("top", "bottom", "left", "right")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class SyntheticSource:
    """A small deterministic LLaVA-JSON-shaped dataset, generated on access: a coloured box on a
    plain background, and questions about its colour and place (one to two rounds), plus some
    text-only arithmetic samples. `captions_only=True` gives single-turn caption samples, all with
    an image (the shape the stage-1 'plain' template takes)."""

    def __init__(self, size: int = 256, seed: int = 0, image_size: int = 28, captions_only: bool = False):
        self.size, self.seed, self.image_size, self.captions_only = int(size), int(seed), int(image_size), captions_only

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"synthetic record {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, index])
        names = list(_COLOURS)
        bg, fg = rng.choice(len(names), size=2, replace=False)
        place = _PLACES[rng.integers(len(_PLACES))]
        record_id = f"synthetic-{index}"
        if not self.captions_only and rng.random() < 0.125:
            a, b = (int(x) for x in rng.integers(0, 5, size=2))
            conversations = [{"from": "human", "value": f"What is {_NUMBERS[a]} plus {_NUMBERS[b]}?"},
                             {"from": "gpt", "value": f"{_NUMBERS[a + b].capitalize()}."}]
            return {"id": record_id, "conversations": conversations, "image": None}
        image = self._draw(rng, _COLOURS[names[bg]], _COLOURS[names[fg]], place)
        caption = f"A {names[fg]} box at the {place} on {names[bg]}."
        if self.captions_only:
            conversations = [{"from": "human", "value": f"Describe the image briefly.\n{IMAGE_PLACEHOLDER}"},
                             {"from": "gpt", "value": caption}]
        else:
            conversations = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nWhat colour is the box?"},
                             {"from": "gpt", "value": f"The box is {names[fg]}."}]
            if rng.random() < 0.5:
                conversations += [{"from": "human", "value": "Where is it?"},
                                  {"from": "gpt", "value": f"It is at the {place}."}]
        return {"id": record_id, "conversations": conversations, "image": image}

    def _draw(self, rng, background, colour, place) -> np.ndarray:
        s = self.image_size
        image = np.empty((s, s, 3), np.uint8)
        image[:] = background
        half = s // 2
        lo = int(rng.integers(0, max(1, half // 3)))
        box = {"top": (slice(lo, half), slice(s // 4, 3 * s // 4)),
               "bottom": (slice(half, s - lo), slice(s // 4, 3 * s // 4)),
               "left": (slice(s // 4, 3 * s // 4), slice(lo, half)),
               "right": (slice(s // 4, 3 * s // 4), slice(half, s - lo))}[place]
        image[box] = colour
        return image
