"""Training batches in the pipeline's format (docs/internals.md), for the train-step, LoRA and
sharding tests."""
from __future__ import annotations

import numpy as np

from llava_jax.data.conversation import IGNORE_INDEX


def make_batch(cfg, batch_size: int, seq_len: int, seed: int = 0, *, packed_rows: int = 1,
               all_masked: bool = False) -> dict:
    """A training batch (docs/internals.md format) with one image per row.

    Every row starts with BOS and an image; the rest is text with a padded tail. The first
    `packed_rows` rows hold a second, text-only sample in segment 2 (positions restart at 0).
    """
    rng = np.random.default_rng(seed)
    t = cfg.num_image_tokens
    ids = np.zeros((batch_size, seq_len), np.int32)
    labels = np.full((batch_size, seq_len), IGNORE_INDEX, np.int32)
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
        lab[: 1 + t] = IGNORE_INDEX
        if split < length:
            lab[split] = IGNORE_INDEX
        labels[b, :length] = lab
    if all_masked:
        labels[:] = IGNORE_INDEX
    pixels = rng.normal(size=(batch_size, 1, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return dict(input_ids=ids, labels=labels, segment_ids=seg, positions=pos, pixel_values=pixels)
