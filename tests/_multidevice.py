"""Helpers for the training tests: numpy batches in the pipeline's format, and subprocess runners
for multi-device (XLA_FLAGS host device count) and multi-process (jax.distributed) checks."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
IGNORE = -100


def make_batch(cfg, batch_size: int, seq_len: int, seed: int = 0, *, packed_rows: int = 1,
               all_masked: bool = False) -> dict:
    """A training batch (docs/internals.md format) with one image per row.

    Every row starts with BOS and an image; the rest is text with a padded tail. The first
    `packed_rows` rows hold a second, text-only sample in segment 2 (positions restart at 0).
    """
    rng = np.random.default_rng(seed)
    t = cfg.num_image_tokens
    vocab = cfg.text.vocab_size
    ids = np.zeros((batch_size, seq_len), np.int32)
    labels = np.full((batch_size, seq_len), IGNORE, np.int32)
    seg = np.zeros((batch_size, seq_len), np.int32)
    pos = np.zeros((batch_size, seq_len), np.int32)
    for b in range(batch_size):
        length = int(rng.integers(seq_len // 2, seq_len - 2))
        split = length // 2 + t if b < packed_rows else length
        row = rng.integers(3, cfg.image_token_id - 1, size=length).astype(np.int32)
        row[0] = 1
        row[1:1 + t] = cfg.image_token_id
        if split < length:
            row[split] = 1  # BOS of the packed sample
        ids[b, :length] = row
        seg[b, :split] = 1
        pos[b, :split] = np.arange(split)
        if split < length:
            seg[b, split:length] = 2
            pos[b, split:length] = np.arange(length - split)
        lab = row.copy()
        lab[: 1 + t] = IGNORE
        if split < length:
            lab[split] = IGNORE
        labels[b, :length] = lab
    if all_masked:
        labels[:] = IGNORE
    pixels = rng.normal(size=(batch_size, 1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return dict(input_ids=ids, labels=labels, segment_ids=seg, positions=pos, pixel_values=pixels)


def subprocess_env(num_devices: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, *, num_devices: int = 1, timeout: float = 300, cwd=None, **env) -> str:
    """Run `code` in a fresh interpreter with `num_devices` CPU devices; return stdout (raise on failure)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=subprocess_env(num_devices, **env))
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc={proc.returncode})\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-8000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NumpyBatches:
    """A deterministic stand-in for the data pipeline: batch i of process p is make_batch(seed=...),
    with get_state/set_state like a Grain iterator."""

    def __init__(self, cfg, local_batch: int, seq_len: int, process_index: int = 0, seed: int = 0,
                 masked_every: int = 0, limit: int = 0):
        self.cfg, self.local_batch, self.seq_len = cfg, local_batch, seq_len
        self.process_index, self.seed, self.masked_every, self.limit = process_index, seed, masked_every, limit
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.limit and self.index >= self.limit:
            raise StopIteration
        i = self.index
        self.index += 1
        masked = bool(self.masked_every) and (i + 1) % self.masked_every == 0
        return make_batch(self.cfg, self.local_batch, self.seq_len, seed=self.seed * 100003 + i * 101 + self.process_index,
                          all_masked=masked)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def numpy_data_factory(seq_len: int = 24, masked_every: int = 0):
    """A train.loop data_factory over NumpyBatches (eval split: a fixed 2-batch set)."""
    from llava_jax.models.config import config_from_any

    def factory(config, tokenizer, model_config, *, process_index, process_count, split="train"):
        cfg = config_from_any(model_config)
        local = config.global_batch_size // process_count
        if split == "eval":
            return NumpyBatches(cfg, local, seq_len, process_index, seed=999, limit=2)
        return NumpyBatches(cfg, local, seq_len, process_index, seed=config.seed, masked_every=masked_every)

    return factory
