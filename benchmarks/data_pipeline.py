"""Data pipeline: Grain throughput at 336 px vs the CPU train step's consumption, and padding waste.

Part 1, throughput. JPEG photos are generated from scikit-image's bundled photos (random crops,
resized to random sizes between 240 and 1000 px per side, quality 90) with LLaVA-style records
(one image, a few question/answer turns) in a JSON file; the real pipeline
(llava_jax.data.pipeline.build_iterator: tokenize + mask, decode, pad-to-square, resize, normalize,
batch) turns them into batches of 8 rows x 2048 tokens at 336 px, with 0 and 2 worker processes.
samples/s is measured after the first batch (worker start-up excluded). The training step's
consumption rate is read from benchmarks/results/train_throughput.json when that run exists.

Part 2, token efficiency (= real tokens / all tokens of the batches) of padded vs packed batches
(the real BatchIterator, next-fit packing, max_length 2048, 16 rows per batch) on an assumed
LLaVA-mix665K-like length distribution (the dataset is not available offline, so these are
assumptions, printed with the results):
  94% image samples: 576 image tokens + text ~ lognormal(median 150 tokens, sigma 0.7), text clipped
                     to [16, 1472]
   6% text-only (ShareGPT-like): lognormal(median 600 tokens, sigma 0.8), clipped to [16, 2048]
Packing is limited by max_images_per_row (image slots per row, which the vision tower computes even
when empty), so packed rows are given 1, 2 and 4 image slots; image-slot efficiency is reported too.

  .venv/bin/python benchmarks/data_pipeline.py [--images 48 --batches 6 --batch 8] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import _common as C  # noqa: E402

import numpy as np  # noqa: E402

# Words the test tokenizer knows (llava_jax/testing/tokenizer.py), so text has realistic token counts.
_WORDS = ("what is shown in the image describe picture photo colour red green blue yellow black white circle "
          "square left right top bottom center large small how many there are of on with this that the one two "
          "three four object objects scene background near far above below").split()
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "camera", "coins", "moon")

IMAGE_FRACTION = 0.94
IMAGE_TEXT_MEDIAN, IMAGE_TEXT_SIGMA, IMAGE_TEXT_CLIP = 150, 0.7, (16, 1472)
TEXT_ONLY_MEDIAN, TEXT_ONLY_SIGMA, TEXT_ONLY_CLIP = 600, 0.8, (16, 2048)


def make_photos(folder: pathlib.Path, count: int, seed: int = 0) -> list:
    """`count` JPEG variants of scikit-image's photos: random crop (50-100% per side), random size."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).convert("RGB")
        image = image.resize((int(rng.integers(240, 1001)), int(rng.integers(240, 1001))), Image.BICUBIC)
        name = f"photo_{i:04d}.jpg"
        image.save(folder / name, quality=90)
        names.append(name)
    return names


def _text(rng, words: int) -> str:
    return " ".join(rng.choice(_WORDS, size=max(1, words)))


def make_records(names: list, count: int, seed: int = 0) -> list:
    """LLaVA records: one image each, 1-4 question/answer turns of moderate length."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        turns = []
        for t in range(int(rng.integers(1, 5))):
            question = _text(rng, int(rng.integers(5, 20)))
            turns.append({"from": "human", "value": ("<image>\n" + question) if t == 0 else question})
            turns.append({"from": "gpt", "value": _text(rng, int(rng.lognormal(np.log(30), 0.7)))})
        records.append({"id": f"bench-{i}", "image": names[i % len(names)], "conversations": turns})
    return records


def pipeline_throughput(folder: pathlib.Path, records: list, tokenizer, image_token_id: int, *, batch: int,
                        batches: int, workers: int) -> dict:
    from llava_jax.data import pipeline
    from llava_jax.data.sources import JsonSource

    path = folder / "records.json"
    path.write_text(json.dumps(records))
    sample = pipeline.SampleSpec(template="vicuna_v1", image_aspect="pad", image_size=336,
                                 image_token_id=image_token_id, num_image_tokens=576, max_length=2048)
    spec = pipeline.BatchSpec(batch_size=batch, max_length=2048, image_size=336)
    it = pipeline.build_iterator(JsonSource(str(path), str(folder)), tokenizer, sample, spec, seed=0,
                                 num_workers=workers)
    t0 = time.perf_counter()
    first = next(it)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    real = 0
    for _ in range(batches):
        b = next(it)
        real += int((b["segment_ids"] != 0).sum())
    elapsed = time.perf_counter() - t0
    assert first["pixel_values"].shape == (batch, 1, 336, 336, 3)
    return dict(workers=workers, batch=batch, batches_timed=batches, first_batch_s=startup,
                samples_per_s=batch * batches / elapsed, skipped=it.skips.total,
                mean_real_tokens_per_row=real / (batch * batches))


# ----- part 2: padding waste ------------------------------------------------------------------------

def sample_lengths(count: int, seed: int = 0) -> list:
    """(tokens, images) per sample under the assumed mix665K-like distribution (module docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if rng.random() < IMAGE_FRACTION:
            text = int(np.clip(rng.lognormal(np.log(IMAGE_TEXT_MEDIAN), IMAGE_TEXT_SIGMA), *IMAGE_TEXT_CLIP))
            out.append((576 + text, 1))
        else:
            out.append((int(np.clip(rng.lognormal(np.log(TEXT_ONLY_MEDIAN), TEXT_ONLY_SIGMA), *TEXT_ONLY_CLIP)), 0))
    return out


def token_efficiency(lengths: list, *, packing: bool, images_per_row: int, rows: int = 16) -> dict:
    """Run the real BatchIterator over samples of the given lengths (tiny 1-px images: only token
    and slot counts matter here) and count real vs total tokens and used vs total image slots."""
    import grain

    from llava_jax.data import pipeline

    samples = [{"id": f"s{i}", "input_ids": np.ones(n, np.int32), "labels": np.ones(n, np.int32),
                "pixel_values": np.zeros((k, 1, 1, 3), np.float32)} for i, (n, k) in enumerate(lengths)]
    spec = pipeline.BatchSpec(batch_size=rows, max_length=2048, image_size=1,
                              max_images_per_row=images_per_row, packing=packing)
    it = pipeline.BatchIterator(iter(grain.MapDataset.source(samples).to_iter_dataset()), spec)
    real = total = batches = images = 0
    sizes = []
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        rows_used = [len(r) for r in it.last_batch_ids]
        if min(rows_used) == 0:  # the stream's last, partly empty batch
            break
        batches += 1
        real += int((batch["segment_ids"] != 0).sum())
        total += batch["segment_ids"].size
        images += sum(lengths[int(i[1:])][1] for r in it.last_batch_ids for i in r)
        sizes += rows_used
    return dict(token_efficiency=real / total, padding_waste=1 - real / total,
                image_slot_efficiency=images / (batches * rows * images_per_row),
                samples_per_row=float(np.mean(sizes)), batches=batches)


def efficiency_table(count: int) -> list:
    lengths = sample_lengths(count)
    rows = []
    for packing, slots in ((False, 1), (True, 1), (True, 2), (True, 4)):
        r = token_efficiency(lengths, packing=packing, images_per_row=slots)
        rows.append(dict(batching="packed" if packing else "padded to max_length", image_slots_per_row=slots, **r,
                         rows_per_1k_samples=1000 / r["samples_per_row"]))
    # For comparison, the reference's dynamic shapes (not our fixed ones): each batch padded to its
    # longest sample, in stream order and with the reference's length grouping (sorted megabatches).
    tokens = np.array([n for n, _ in lengths])
    for name, order in (("reference: pad to batch longest", np.arange(len(tokens))),
                        ("reference: + length grouping", _grouped_order(tokens, 16 * 8))):
        t = tokens[order][: len(tokens) // 16 * 16].reshape(-1, 16)
        eff = t.sum() / (t.max(axis=1) * 16).sum()
        rows.append(dict(batching=name, image_slots_per_row=1, samples_per_row=1.0, token_efficiency=eff,
                         padding_waste=1 - eff, rows_per_1k_samples=1000.0))
    return rows


def _grouped_order(tokens: np.ndarray, megabatch: int) -> np.ndarray:
    """Shuffle, then sort each megabatch by length (the reference's length-grouped sampler)."""
    rng = np.random.default_rng(1)
    order = rng.permutation(len(tokens))
    return np.concatenate([sorted(order[i:i + megabatch], key=lambda j: -tokens[j])
                           for i in range(0, len(order), megabatch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=48, help="distinct JPEG files to generate")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6, help="batches timed after the first")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--lengths", type=int, default=20000, help="samples for the token-efficiency part")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from llava_jax.testing.tokenizer import IMAGE_TOKEN_ID, llama_tokenizer

    info = C.machine_info()
    print(f"machine: {info}")
    tokenizer = llama_tokenizer()
    throughput = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        names = make_photos(folder, args.images)
        sizes = [p.stat().st_size for p in folder.glob("*.jpg")]
        print(f"{len(names)} JPEGs, mean {np.mean(sizes) / 1024:.0f} KiB")
        records = make_records(names, args.records)
        for w in [int(x) for x in args.workers.split(",")]:
            throughput.append(pipeline_throughput(folder, records, tokenizer, IMAGE_TOKEN_ID, batch=args.batch,
                                                  batches=args.batches, workers=w))
            print(throughput[-1], f"load {C.load_average()[0]:.2f}")

    consumption = None
    train_json = C.RESULTS / "train_throughput.json"
    if train_json.exists():
        t = json.loads(train_json.read_text())
        consumption = {k: v for k, v in t["samples_per_s"].items()}
        print(f"train step consumption (from {train_json.name}, {t['machine']['date']}): {consumption}")
    for row in throughput:
        if consumption:
            row["vs_fastest_train_step"] = row["samples_per_s"] / max(consumption.values())
    C.print_table(throughput, ["workers", "batch", "first_batch_s", "samples_per_s", "vs_fastest_train_step",
                               "mean_real_tokens_per_row", "skipped"], "pipeline throughput, 336 px JPEGs")

    efficiency = efficiency_table(args.lengths)
    C.print_table(efficiency, ["batching", "image_slots_per_row", "samples_per_row", "token_efficiency",
                               "padding_waste", "image_slot_efficiency", "rows_per_1k_samples"],
                  f"token efficiency, {args.lengths} samples, max_length 2048, 16 rows per batch")

    C.write_json("data_pipeline", dict(
        machine=info, throughput=throughput, train_consumption_samples_per_s=consumption,
        efficiency=efficiency, length_model=dict(
            image_fraction=IMAGE_FRACTION, image_text_median=IMAGE_TEXT_MEDIAN, image_text_sigma=IMAGE_TEXT_SIGMA,
            image_text_clip=IMAGE_TEXT_CLIP, text_only_median=TEXT_ONLY_MEDIAN, text_only_sigma=TEXT_ONLY_SIGMA,
            text_only_clip=TEXT_ONLY_CLIP, image_tokens=576)), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
