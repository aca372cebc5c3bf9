"""LLaVA-1.6 (AnyRes) training: the data pipeline gives every image its own placeholder run
(`anyres.num_image_tokens` of its size) and tile slots, packed rows keep their images in slot order,
stage 2 trains through `llava_jax.train.loop` on JSON data with images of different aspect ratios,
the train step compiles ahead of time from abstract AnyRes batches, and validation sizes max_length
against the AnyRes worst case."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from llava_jax import validate
from llava_jax.data import anyres
from llava_jax.models.config import TextConfig, VisionConfig, config_from_any
from llava_jax.recipes import tiny
from llava_jax.testing.processes import REPO
from llava_jax.train import loop
from llava_jax.train.metrics import read_metrics

TILE = 28  # the tiny tower's input size; the v1.6 grids scaled by 28 / 336
PINPOINTS = tuple((h * TILE // 336, w * TILE // 336) for h, w in anyres.DEFAULT_GRID_PINPOINTS)
# Patch 7: 4 x 4 features per tile, so the wide and tall images keep some rows after unpadding.
VISION = VisionConfig(image_size=TILE, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
# (width, height): square (2 x 2 grid), very wide (1 x 3), very tall (3 x 1), 2:1 (1 x 2), 1:2 (2 x 1)
SIZES = {"square": (40, 40), "wide": (90, 28), "tall": (26, 88), "landscape": (60, 30), "portrait": (31, 62)}
WORDS = ["red", "green", "blue", "round", "striped", "small", "large", "bright"]


def v16_config(data_dir: pathlib.Path, **overrides):
    c = tiny.get_config("stage2")
    model = dataclasses.replace(tiny.tiny_llava_config(), vision=VISION, image_grid_pinpoints=PINPOINTS,
                              text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                                              num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                                              rms_norm_eps=1e-6))
    c.model = type(c.model)(model.to_dict())
    c.max_length = 192  # two worst-case images (2 x 88 tokens) and some text
    c.total_steps = 6
    c.global_batch_size = 2
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.0
    c.checkpoint_every = 100
    c.data.source = "json"
    c.data.json_path = str(data_dir / "data.json")
    c.data.image_folder = str(data_dir / "images")
    c.data.max_images_per_row = 2
    c.data.packing = True
    c.data.shuffle_seed = 0
    for key, value in overrides.items():  # top-level keys only
        c[key] = value
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Five images of different aspect ratios (a seeded pattern each) and a text-only record."""
    root = tmp_path_factory.mktemp("anyres_data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        pixels = (rng.integers(0, 256, (h, w, 3)) // 64 * 64).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
        records.append({"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is shown ?"}, {"from": "gpt", "value": answer}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "say the colours"},
                                                    {"from": "gpt", "value": " ".join(WORDS[:5])}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(data_dir, tmp_path_factory):
    """The word-level tokenizer the synthetic source would build, over this JSON's text."""
    out = tmp_path_factory.mktemp("tok")
    loop.synthetic_tokenizer(v16_config(data_dir)).save_pretrained(str(out))
    return out


def _expected(record_id, data_dir):
    w, h = SIZES[record_id]
    return anyres.feature_layout((h, w), PINPOINTS, TILE, VISION.patch_size)


def _runs(ids, token):
    """Lengths of the maximal runs of `token` in a row."""
    out, n = [], 0
    for t in list(ids) + [None]:
        if t == token:
            n += 1
        elif n:
            out, n = out + [n], 0
    return out


class _Recording:
    """The default data iterator, keeping every batch it hands to the loop (and its record ids)."""

    def __init__(self, inner, seen):
        self._inner, self._seen = inner, seen

    def __next__(self):
        batch = next(self._inner)
        self._seen.append((batch, self._inner.last_batch_ids))
        return batch

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_stage2_trains_on_anyres_batches(data_dir, tokenizer_dir, tmp_path):
    config = v16_config(data_dir, tokenizer=str(tokenizer_dir))
    mc = config_from_any(config.model)
    seen = []

    def data_factory(*args, **kwargs):
        return _Recording(loop.default_data_factory(*args, **kwargs), seen)

    result = loop.train(config, str(tmp_path / "w"), data_factory=data_factory, progress=False)
    assert result["status"] == "finished" and result["step"] == 6

    p = anyres.max_tiles(PINPOINTS, TILE)
    packed_rows = 0
    for batch, row_ids in seen:
        assert batch["pixel_values"].shape == (2, 2, p, TILE, TILE, 3)
        assert batch["image_sizes"].shape == (2, 2, 5) and batch["image_sizes"].dtype == np.int32
        for r, ids in enumerate(row_ids):
            images = [i for i in ids if i != "text"]
            packed_rows += len(ids) > 1
            layouts = [_expected(i, data_dir) for i in images]
            # one placeholder run per image, in slot order, as long as the processor would make it
            assert _runs(batch["input_ids"][r], mc.image_token_id) == [
                anyres.num_image_tokens(SIZES[i][::-1], PINPOINTS, TILE, VISION.patch_size) for i in images]
            np.testing.assert_array_equal(batch["image_sizes"][r, :len(images)], [lay.as_row() for lay in layouts])
            assert not batch["image_sizes"][r, len(images):].any()
            for slot, lay in enumerate(layouts):  # tiles beyond the image's grid stay zero
                assert np.abs(batch["pixel_values"][r, slot, :lay.num_tiles]).sum(axis=(1, 2, 3)).min() > 0
                assert not batch["pixel_values"][r, slot, lay.num_tiles:].any()
    assert packed_rows > 0  # packing put several samples (and images) in one row
    # the five aspect ratios give different grids and token counts
    assert len({_expected(i, data_dir).num_tokens for i in SIZES}) == len(SIZES)

    losses = [r["loss"] for r in read_metrics(str(tmp_path / "w")) if "loss" in r]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses


def test_train_step_compiles_from_abstract_anyres_batches(data_dir):
    from llava_jax import aot

    config = v16_config(data_dir)
    _, compiled = aot.compile_train_step(config, jax.devices()[:1])
    (_, batch_avals), _ = compiled.in_avals  # ((state, batch), kwargs)
    assert batch_avals["image_sizes"].shape == (2, 2, 5)
    assert batch_avals["pixel_values"].shape == (2, 2, anyres.max_tiles(PINPOINTS, TILE), TILE, TILE, 3)


def test_max_length_is_checked_against_the_anyres_worst_case(data_dir):
    config = v16_config(data_dir, max_length=150)
    worst = max(anyres.num_image_tokens(pt, PINPOINTS, TILE, VISION.patch_size) for pt in PINPOINTS)
    assert worst == 16 + 8 * 9  # the 2 x 2 grid, nothing unpadded: 4 x 4 base + 8 rows of 8 + newline
    assert validate.max_image_tokens(config_from_any(config.model)) == worst
    with pytest.raises(validate.ConfigError, match=rf"max_length=150 leaves no room for text after the "
                                                   rf"{2 * worst} image tokens of a row \(AnyRes worst case: "
                                                   rf"2 x {worst} tokens.*set --config.max_length=256"):
        validate.check_train(config, 1, check_paths=False)
    validate.check_train(v16_config(data_dir, max_length=2 * worst + 1), 1, check_paths=False)


def test_sample_builder_counts_an_unusable_image_as_a_skip(data_dir, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from llava_jax.data.pipeline import SampleBuilder, SampleSpec

    Image.fromarray(np.full((3, 300, 3), 200, np.uint8)).save(tmp_path / "thin.png")
    spec = SampleSpec(image_size=TILE, image_token_id=127, max_length=256, grid_pinpoints=PINPOINTS,
                      patch_size=VISION.patch_size)
    build = SampleBuilder(AutoTokenizer.from_pretrained(str(tokenizer_dir)), spec)
    turns = [{"from": "human", "value": "<image>\nwhat is shown ?"}, {"from": "gpt", "value": "red"}]
    thin = build({"id": "thin", "image": str(tmp_path / "thin.png"), "conversations": turns})
    assert thin["skip"] == "unusable_image" and "too thin for AnyRes" in thin["message"]
    text = build({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]})
    assert text["pixel_values"].shape == (0, anyres.max_tiles(PINPOINTS, TILE), TILE, TILE, 3)
    assert text["image_layouts"].shape == (0, 5) and 127 not in text["input_ids"]
    square = build({"id": "sq", "image": str(data_dir / "images" / "square.png"), "conversations": turns})
    assert (square["input_ids"] == 127).sum() == _expected("square", data_dir).num_tokens
