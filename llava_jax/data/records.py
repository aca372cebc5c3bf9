"""The record every source gives and the pipeline reads, and the two stored forms it comes from.

A record is a dict:
  id             str, names the record in logs and errors ("<file>#<index>" when the JSON has no id)
  conversations  the LLaVA JSON list [{"from": "human"|"gpt", "value": str}, ...] (unvalidated)
  image          None (text-only), a file path, encoded image bytes, or a uint8 array
  image_missing  present (True) only when the image file was missing when the data was prepared
  error          present only when the record itself could not be read (bad JSONL line, not a dict)
Validation happens when a record becomes a sample (llava_jax.data.pipeline), so a bad record is
skipped and counted there instead of stopping a long job at reading.

Here are the two stored forms: LLaVA JSON/JSONL entries (`read_llava_json`, `raw_to_record`) and the
examples of a dataset written by `llava-jax data prepare` (`example_to_record`, `find_dataset_dir`).
sources.py (reading) and tfds_builder.py (writing) both build on this module, not on each other.
"""
from __future__ import annotations

import json
import os
from typing import Optional

DATASET_NAME = "llava_records"  # the TFDS name of tfds_builder's LlavaRecords builder
VERSION = "1.0.0"


def read_llava_json(path: str) -> list:
    """A LLaVA JSON list or a JSONL file -> list of raw entries. A JSONL line that does not parse
    becomes an entry with 'error' (skipped and counted later); a JSON file that does not parse raises."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return data
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            entries.append({"id": f"{os.path.basename(path)}:{lineno}", "error": f"line {lineno}: bad JSON ({e})"})
    return entries


def raw_to_record(raw, fallback_id: str, image_folder: Optional[str] = None) -> dict:
    """One LLaVA JSON entry -> a record; the image path is resolved against `image_folder`."""
    if not isinstance(raw, dict):
        return {"id": fallback_id, "conversations": None, "image": None,
                "error": f"entry must be a JSON object, found {type(raw).__name__}"}
    record = {"id": str(raw.get("id", fallback_id)), "conversations": raw.get("conversations"), "image": None}
    if "error" in raw:
        record["error"] = raw["error"]
    image = raw.get("image")
    if isinstance(image, list):  # some mixtures store a list; LLaVA v1/v1.5 use one image per sample
        image = image[0] if len(image) == 1 else image
    if image:
        record["image"] = os.path.join(image_folder, image) if image_folder and isinstance(image, str) else image
    return record


def example_to_record(example: dict) -> dict:
    """What `as_data_source()` returns for one prepared example (tfds_builder.record_to_example
    wrote it) -> a record."""
    def text(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    record = {"id": text(example["id"]), "image": None}
    conversations = json.loads(text(example["conversations"]))
    if isinstance(conversations, dict) and "error" in conversations:
        record["error"] = conversations["error"]
        conversations = None
    record["conversations"] = conversations
    path = text(example["image_path"])
    if path:
        if int(example["image_missing"]):
            record["image"] = path  # resolves to a missing file: skipped and counted as missing_image
            record["image_missing"] = True
        else:
            record["image"] = bytes(example["image"])
    return record


def find_dataset_dir(directory: str) -> str:
    """Accept the --out folder of `data prepare` or the versioned dataset folder inside it."""
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return directory
    candidate = os.path.join(directory, DATASET_NAME, VERSION)
    if os.path.isfile(os.path.join(candidate, "dataset_info.json")):
        return candidate
    raise FileNotFoundError(f"no prepared dataset in {directory} (expected {candidate}/dataset_info.json; "
                            f"create it with `llava-jax data prepare --json FILE --images DIR --out {directory}`)")
