"""LLaVA JSON + images -> ArrayRecord shards through a TFDS builder (no TensorFlow needed).

Images are stored as their encoded file bytes in `tfds.features.Tensor(shape=(), dtype=np.object_)`
(tfds.features.Image would need TensorFlow to encode). A record whose image file is missing is kept
with empty image bytes and `image_missing=1`, so training skips and counts it under its id instead of
the record vanishing at preparation time.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

# example_to_record and find_dataset_dir are the reading side (llava_jax.data.records); importable from here too
from llava_jax.data.records import (DATASET_NAME, VERSION, example_to_record, find_dataset_dir, raw_to_record,
                                    read_llava_json)

__all__ = ["DATASET_NAME", "VERSION", "example_to_record", "find_dataset_dir", "prepare", "record_to_example"]

log = logging.getLogger(__name__)


def _builder_class():
    import tensorflow_datasets as tfds
    from etils import epath

    class LlavaRecords(tfds.core.GeneratorBasedBuilder):
        """LLaVA instruction records with their images' encoded bytes."""

        VERSION = tfds.core.Version(VERSION)
        # TFDS locates a builder's code through `importlib_resources` when the class lives in a
        # package, a package this environment may lack; the plain file path is what it falls back to.
        code_path = epath.Path(__file__)

        def __init__(self, *, json_path: Optional[str] = None, image_folder: str = "", split: str = "train",
                     progress: bool = True, **kwargs):
            self._json_path, self._image_folder, self._split = json_path, image_folder, split
            self._progress = progress
            self.missing_images = []
            super().__init__(**kwargs)

        def _info(self):
            def obj():
                return tfds.features.Tensor(shape=(), dtype=np.object_)

            return tfds.core.DatasetInfo(
                builder=self, description="LLaVA JSON records with encoded image bytes (llava-jax)",
                features=tfds.features.FeaturesDict({
                    "id": obj(), "conversations": obj(), "image": obj(), "image_path": obj(),
                    "image_missing": tfds.features.Tensor(shape=(), dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            from tqdm.auto import tqdm

            entries = read_llava_json(self._json_path)
            name = os.path.basename(self._json_path)
            bar = tqdm(entries, desc=f"encoding {name}", unit="rec", disable=not self._progress)
            for index, raw in enumerate(bar):
                record = raw_to_record(raw, f"{name}#{index}")
                yield index, record_to_example(record, self._image_folder, self.missing_images)
                if self.missing_images:
                    bar.set_postfix(missing_images=len(self.missing_images), refresh=False)

    return LlavaRecords


def record_to_example(record: dict, image_folder: str, missing: list) -> dict:
    image_path = record.get("image") or ""
    if not isinstance(image_path, str):
        image_path = json.dumps(image_path)  # an unexpected shape: kept verbatim, rejected at training
    data, is_missing = b"", 0
    if image_path:
        full = os.path.join(image_folder, image_path)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                data = f.read()
        else:
            is_missing = 1
            missing.append(record["id"])
            log.warning("record %s: image file not found: %s (kept; training will skip it)", record["id"], full)
    conversations = record.get("conversations")
    if "error" in record:  # keep the reader's error with the record
        conversations = {"error": record["error"]}
    return {"id": record["id"], "conversations": json.dumps(conversations, ensure_ascii=False),
            "image": data, "image_path": image_path, "image_missing": is_missing}


def prepare(json_path: str, image_folder: str, out_dir: str, split: str = "train", progress: bool = True) -> dict:
    """Write the ArrayRecord shards; returns {'directory', 'records', 'missing_images'}."""
    import tensorflow_datasets as tfds

    builder = _builder_class()(json_path=json_path, image_folder=image_folder, split=split, progress=progress,
                               data_dir=out_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return {"directory": builder.data_dir, "records": builder.info.splits[split].num_examples,
            "missing_images": list(builder.missing_images)}
