"""The training input pipeline (Grain): records -> samples -> fixed-shape batches.

  source (llava_jax.data.sources)
   -> epoch order: seeded global shuffle per epoch, or the reference's modality/length grouping
   -> this host's shard: every process_count-th element from process_index (disjoint, covering)
   -> SampleBuilder (in `num_workers` worker processes): validate, tokenize + mask, load + preprocess
      the image; a bad record becomes a skip marker instead of an exception
   -> BatchIterator (main process): counts and logs skips, packs or pads rows into a batch

Each index of the ordered stream yields exactly one element (a sample or a skip marker) before
batching, so the batches do not depend on num_workers. The iterator's state is Grain's state of the
sample stream plus the skip counts, taken before the first sample not yet in an emitted batch:
restoring it yields exactly the batches an uninterrupted iterator would have yielded.

Batches follow docs/internals.md "Training batches": input_ids, labels, segment_ids, positions
(B, S) int32 and pixel_values (B, M, H, W, 3) float32. For an AnyRes model (LLaVA-1.6:
`image_grid_pinpoints` set) an image has P tile slots and its own placeholder count
(`anyres.num_image_tokens` of its size): pixel_values is (B, M, P, H, W, 3) and `image_sizes` holds
each slot's int32 layout (B, M, 5) (`llava_next.LAYOUT_FIELDS`; zeros in unused slots), computed in
the workers so the jitted step reads them as plain data.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import sys
from typing import Optional, Sequence

import grain
import numpy as np

from llava_jax.data import anyres
from llava_jax.data import conversation as conv
from llava_jax.data import image as image_lib
from llava_jax.data import sources as sources_lib

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Ints per AnyRes image layout: len(llava_next.LAYOUT_FIELDS), not imported (it would load jax into
# the data workers).
LAYOUT_WIDTH = 5


class DataError(ValueError):
    """A bad record in strict mode; the message names the record and the reason."""


# ----- counting what was skipped ----------------------------------------------------------------

class SkipCounter:
    """Skipped records by reason, with the first few record ids of each reason."""

    MAX_IDS = 20

    def __init__(self):
        self.counts = collections.Counter()
        self.ids = collections.defaultdict(list)
        self.samples = 0

    def add(self, reason: str, record_id: str, message: str):
        self.counts[reason] += 1
        if len(self.ids[reason]) < self.MAX_IDS:
            self.ids[reason].append(record_id)
        log.warning("skipped record %s (%s): %s", record_id, reason, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state(self) -> dict:
        return {"counts": dict(self.counts), "ids": {k: list(v) for k, v in self.ids.items()}, "samples": self.samples}

    def set_state(self, state: dict):
        self.counts = collections.Counter(state.get("counts", {}))
        self.ids = collections.defaultdict(list, {k: list(v) for k, v in state.get("ids", {}).items()})
        self.samples = int(state.get("samples", 0))

    def summary(self) -> str:
        if not self.counts:
            return f"data: {self.samples} samples used, none skipped"
        parts = [f"{reason}={n} (e.g. {', '.join(self.ids[reason][:3])})" for reason, n in sorted(self.counts.items())]
        return f"data: {self.samples} samples used, {self.total} records skipped: " + "; ".join(parts)


# ----- record -> sample (runs in worker processes) ------------------------------------------------

@dataclasses.dataclass
class SampleSpec:
    template: str = "vicuna_v1"
    image_aspect: str = "pad"
    image_size: int = 336
    image_token_id: int = 32000
    num_image_tokens: int = 576
    max_length: int = 2048
    max_images_per_row: int = 1
    # AnyRes (LLaVA-1.6): the model's grids, (height, width) pairs; None = one tile per image (1.5).
    grid_pinpoints: Optional[tuple] = None
    patch_size: int = 14


class SampleBuilder:
    """record -> {'id', 'input_ids', 'labels', 'pixel_values' (n, H, W, 3)} or a skip marker
    {'id', 'skip': reason, 'message'}. With AnyRes, pixel_values is (n, P, H, W, 3) and
    'image_layouts' (n, 5) int32 is added. Never raises for bad data (strictness is the consumer's);
    a template the tokenizer cannot serve is refused here, at set-up (conv.TemplateMismatch), not
    skipped record by record."""

    def __init__(self, tokenizer, spec: SampleSpec):
        conv.check_tokenizer(spec.template, tokenizer)
        self.tokenizer, self.spec = tokenizer, spec

    def __call__(self, record) -> dict:
        record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        try:
            return self._build(record, record_id)
        except conv.BadSample as e:
            return {"id": record_id, "skip": e.reason, "message": str(e)}
        except Exception as e:  # an unforeseen defect in one record must not stop the job either
            return {"id": record_id, "skip": "unexpected_error", "message": f"{type(e).__name__}: {e}"}

    def _build(self, record, record_id: str) -> dict:
        s = self.spec
        if not isinstance(record, dict):
            raise conv.MalformedConversation(f"record is a {type(record).__name__}, not a dict")
        if record.get("error"):
            raise conv.MalformedConversation(record["error"])
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise conv.MalformedConversation(f"'conversations' must be a non-empty list, found {turns!r:.60}")
        values = [t.get("value") if isinstance(t, dict) else None for t in turns]
        placeholders = sum(v.count(conv.IMAGE_PLACEHOLDER) for v in values if isinstance(v, str))
        has_image = record.get("image") is not None and not (isinstance(record["image"], (str, bytes)) and
                                                              not record["image"])
        if has_image and placeholders == 0:
            raise conv.BadSample("the record has an image but no <image> in its turns", "image_without_placeholder")
        if not has_image and placeholders > 0:
            raise conv.BadSample(f"<image> appears {placeholders}x but the record has no image",
                                 "placeholder_without_image")
        if placeholders > 1:
            raise conv.BadSample(f"<image> appears {placeholders}x for one image", "too_many_placeholders")
        num_images = 1 if has_image else 0
        if num_images > s.max_images_per_row:
            raise conv.BadSample(f"{num_images} images but max_images_per_row={s.max_images_per_row}",
                                 "too_many_images")
        if s.grid_pinpoints is not None:
            return self._build_anyres(record, record_id, turns, has_image)
        encoded = conv.encode(turns, self.tokenizer, s.template, s.image_token_id, s.num_image_tokens,
                              max_length=s.max_length)
        if has_image:
            if record.get("image_missing"):
                raise image_lib.MissingImage(f"image file not found when the data was prepared: {record['image']}")
            pixels = image_lib.preprocess(record["image"], s.image_size, s.image_aspect)[None]
        else:
            pixels = np.zeros((0, s.image_size, s.image_size, 3), np.float32)
        return {"id": record_id, **encoded, "pixel_values": pixels}

    def _build_anyres(self, record, record_id: str, turns, has_image: bool) -> dict:
        """The image's size fixes its placeholder count, so it is decoded before the text is encoded."""
        s = self.spec
        num_tiles = anyres.max_tiles(s.grid_pinpoints, s.image_size)
        pixels = np.zeros((0, num_tiles, s.image_size, s.image_size, 3), np.float32)
        layouts = np.zeros((0, LAYOUT_WIDTH), np.int32)
        counts = []
        if has_image:
            if record.get("image_missing"):
                raise image_lib.MissingImage(f"image file not found when the data was prepared: {record['image']}")
            tiles, size_hw = anyres.preprocess_anyres(record["image"], s.grid_pinpoints, s.image_size, num_tiles)
            layout = anyres.feature_layout(size_hw, s.grid_pinpoints, s.image_size, s.patch_size)
            pixels, layouts, counts = tiles[None], np.asarray([layout.as_row()], np.int32), [layout.num_tokens]
        encoded = conv.encode(turns, self.tokenizer, s.template, s.image_token_id, counts or s.num_image_tokens,
                              max_length=s.max_length)
        return {"id": record_id, **encoded, "pixel_values": pixels, "image_layouts": layouts}


# ----- epoch order ------------------------------------------------------------------------------

def _length_grouped(lengths: np.ndarray, megabatch: int, rng: np.random.Generator) -> list:
    """The reference's get_length_grouped_indices (one host view): shuffle, cut into megabatches,
    sort each by length, longest first."""
    order = rng.permutation(len(lengths))
    out = []
    for i in range(0, len(order), megabatch):
        chunk = order[i:i + megabatch]
        out.extend(sorted(chunk.tolist(), key=lambda j: -lengths[j]))
    return out


def modality_length_order(lengths: Sequence[int], megabatch: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's get_modality_length_grouped_indices. `lengths` > 0 for samples with an image,
    < 0 for text-only: each megabatch (= one global batch) is all-image or all-text, sorted by length;
    megabatches are shuffled; the two leftovers form a last mixed megabatch."""
    lengths = np.asarray(lengths)
    if (lengths == 0).any():
        raise ValueError("modality lengths must be non-zero (positive: image, negative: text-only)")
    if (lengths > 0).all() or (lengths < 0).all():
        return np.asarray(_length_grouped(np.abs(lengths), megabatch, rng), np.int64)
    mm = np.flatnonzero(lengths > 0)
    lang = np.flatnonzero(lengths < 0)
    mm_order = mm[_length_grouped(lengths[mm], megabatch, rng)]
    lang_order = lang[_length_grouped(-lengths[lang], megabatch, rng)]
    mm_mb = [mm_order[i:i + megabatch] for i in range(0, len(mm_order), megabatch)]
    lang_mb = [lang_order[i:i + megabatch] for i in range(0, len(lang_order), megabatch)]
    leftover = np.sort(np.concatenate([mm_mb[-1], lang_mb[-1]]))
    full = mm_mb[:-1] + lang_mb[:-1]
    out = [full[i] for i in rng.permutation(len(full))] + ([leftover] if len(leftover) else [])
    return np.concatenate(out).astype(np.int64)


def modality_lengths(source) -> np.ndarray:
    """Word counts of each record, negative for text-only ones (the reference's modality_lengths)."""
    out = np.empty(len(source), np.int64)
    for i in range(len(source)):
        r = source[i]
        turns = r.get("conversations") if isinstance(r, dict) else None
        words = sum(len(str(t.get("value", "")).split()) for t in turns if isinstance(t, dict)) if isinstance(
            turns, list) else 0
        words = max(words, 1)
        out[i] = words if r.get("image") else -words
    return out


class EpochOrder(grain.MapDataset):
    """Index i -> parent[order(epoch)[i % n]] with epoch = i // n: a fresh seeded permutation per epoch
    (or the modality/length grouping when `group_lengths` is given). num_epochs=None: endless."""

    def __init__(self, parent: grain.MapDataset, *, seed: int, shuffle: bool = True,
                 num_epochs: Optional[int] = None, group_lengths=None, group_size: int = 0):
        super().__init__(parent)
        self._n = len(parent)
        if self._n == 0:
            raise ValueError("the data source is empty")
        self._seed, self._shuffle, self._num_epochs = int(seed), shuffle, num_epochs
        self._group_lengths = None if group_lengths is None else np.asarray(group_lengths)
        self._group_size = int(group_size)
        self._cache = {}

    def __len__(self):
        return sys.maxsize if self._num_epochs is None else self._n * self._num_epochs

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            rng = np.random.default_rng([self._seed, epoch])
            if self._group_lengths is not None:
                perm = modality_length_order(self._group_lengths, self._group_size, rng)
            elif self._shuffle:
                perm = rng.permutation(self._n)
            else:
                perm = np.arange(self._n)
            self._cache = {epoch: perm}  # one epoch at a time: bounded memory
        return self._cache[epoch]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if index >= len(self):
            raise IndexError(f"index {index} past the last epoch ({len(self)} elements)")
        epoch, i = divmod(int(index), self._n)
        return self._parent[int(self.order(epoch)[i])]

    def __str__(self):
        return f"EpochOrder(n={self._n}, seed={self._seed}, shuffle={self._shuffle}, epochs={self._num_epochs})"


# ----- samples -> batches -------------------------------------------------------------------------

@dataclasses.dataclass
class BatchSpec:
    batch_size: int          # rows on this host
    max_length: int
    image_size: int
    max_images_per_row: int = 1
    packing: bool = False
    pad_token_id: int = 0
    strict: bool = False
    num_tiles: int = 0       # AnyRes: tile slots per image (anyres.max_tiles); 0 = one tile per image


class BatchIterator:
    """Samples -> fixed-shape batches, by padding (one sample per row) or next-fit packing (samples
    appended to a row while tokens <= max_length and images <= max_images_per_row; segment ids 1..k,
    positions restarting at 0 per sample). Skips are counted in `skips`; strict mode raises DataError.
    A finite stream ends with a last batch whose missing rows are empty (segment 0)."""

    def __init__(self, samples: grain.DatasetIterator, spec: BatchSpec, num_records: Optional[int] = None):
        self._parent, self.spec, self.num_records = samples, spec, num_records
        self.skips = SkipCounter()
        self._pending = None
        self._pending_state = None
        self._last_read_state = None
        self.last_batch_ids = []  # record ids per row of the last batch (for logs and tests)

    def __iter__(self):
        return self

    # -- state --
    def get_state(self) -> dict:
        if self._pending is not None:
            grain_state, skips = self._pending_state
        else:
            grain_state, skips = self._parent.get_state(), self.skips.state()
        return {"version": STATE_VERSION, "grain": copy.deepcopy(grain_state), "skips": copy.deepcopy(skips)}

    def set_state(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        self._parent.set_state(state["grain"])
        self.skips.set_state(state["skips"])
        self._pending = self._pending_state = None

    # -- reading --
    def _take(self) -> dict:
        if self._pending is not None:
            sample, self._pending = self._pending, None
            return sample
        skipped_in_a_row = 0
        while True:
            self._last_read_state = (self._parent.get_state(), self.skips.state())
            element = next(self._parent)
            if "skip" not in element:
                return element
            if self.spec.strict:
                raise DataError(f"record {element['id']}: {element['skip']}: {element['message']}")
            self.skips.add(element["skip"], element["id"], element["message"])
            skipped_in_a_row += 1
            # A repeating stream in which every record is bad would otherwise spin forever.
            if self.num_records and skipped_in_a_row >= self.num_records:
                raise DataError(f"{skipped_in_a_row} records in a row were skipped, as many as the dataset holds: "
                                f"{self.skips.summary()}")

    def __next__(self) -> dict:
        s = self.spec
        rows = [[] for _ in range(s.batch_size)]
        used = [[0, 0] for _ in range(s.batch_size)]  # tokens, images
        r = 0
        while True:
            try:
                sample = self._take()
            except StopIteration:
                if not rows[0]:
                    raise
                break
            n, k = len(sample["input_ids"]), len(sample["pixel_values"])
            fits = s.packing and used[r][0] + n <= s.max_length and used[r][1] + k <= s.max_images_per_row
            if rows[r] and not fits:
                r += 1
                if r == s.batch_size:
                    self._pending, self._pending_state = sample, self._last_read_state
                    break
            rows[r].append(sample)
            used[r][0] += n
            used[r][1] += k
            self.skips.samples += 1
        return self._assemble(rows)

    def _assemble(self, rows) -> dict:
        s = self.spec
        self.last_batch_ids = [[sample["id"] for sample in row] for row in rows]
        b, length, m = s.batch_size, s.max_length, max(1, s.max_images_per_row)
        batch = {
            "input_ids": np.full((b, length), s.pad_token_id, np.int32),
            "labels": np.full((b, length), conv.IGNORE_INDEX, np.int32),
            "segment_ids": np.zeros((b, length), np.int32),
            "positions": np.zeros((b, length), np.int32),
            "pixel_values": np.zeros((b, m) + ((s.num_tiles,) if s.num_tiles else ()) +
                                     (s.image_size, s.image_size, 3), np.float32),
        }
        if s.num_tiles:  # AnyRes: each slot's layout; an unused slot's zeros match no placeholder
            batch["image_sizes"] = np.zeros((b, m, LAYOUT_WIDTH), np.int32)
        for r, row in enumerate(rows):
            start, slot = 0, 0
            for seg, sample in enumerate(row, 1):
                n = len(sample["input_ids"])
                batch["input_ids"][r, start:start + n] = sample["input_ids"]
                batch["labels"][r, start:start + n] = sample["labels"]
                batch["labels"][r, start] = conv.IGNORE_INDEX  # never predict across samples
                batch["segment_ids"][r, start:start + n] = seg
                batch["positions"][r, start:start + n] = np.arange(n)
                k = len(sample["pixel_values"])
                batch["pixel_values"][r, slot:slot + k] = sample["pixel_values"]
                if s.num_tiles:
                    batch["image_sizes"][r, slot:slot + k] = sample["image_layouts"]
                start, slot = start + n, slot + k
        return batch


# ----- assembly -----------------------------------------------------------------------------------

def _parse_absl_flags():
    """Grain's worker processes read absl flags; outside an absl app they are not parsed yet."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1], known_only=True)


def build_iterator(source, tokenizer, sample_spec: SampleSpec, batch_spec: BatchSpec, *, seed: int = 0,
                   shuffle: bool = True, num_epochs: Optional[int] = None, process_index: int = 0,
                   process_count: int = 1, num_workers: int = 0, group_by_modality_length: bool = False,
                   group_size: int = 0) -> BatchIterator:
    """A BatchIterator over `source` (anything with len() and [i] -> record)."""
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count)
    lengths = modality_lengths(source) if group_by_modality_length else None
    ds = EpochOrder(grain.MapDataset.source(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    group_lengths=lengths, group_size=group_size or batch_spec.batch_size * process_count)
    ds = ds[shard.shard_index::shard.shard_count]
    ds = ds.map(SampleBuilder(tokenizer, sample_spec))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_spec.batch_size))
    if num_workers > 0:
        _parse_absl_flags()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, batch_spec.batch_size // num_workers)))
    return BatchIterator(iter(it_ds), batch_spec, num_records=len(source))


def make_source(config, model_config=None, split: str = "train"):
    """The record source config.data.* describes, for 'train' or 'eval'. `config` is the training
    config as its entry point typed it (llava_jax.train.config.TrainConfig; a ConfigDict reads the
    same): the data layer reads fields and casts nothing."""
    d = config.data
    kind = d.source
    if kind == "synthetic":
        image_size = model_config.vision.image_size if model_config is not None else 28
        size = d.synthetic_size if split == "train" else max(8, d.synthetic_size // 8)
        return sources_lib.SyntheticSource(size=size, seed=config.seed + (0 if split == "train" else 1000),
                                           image_size=image_size, captions_only=(d.template == "plain"))
    if kind == "json":
        path = d.json_path if split == "train" else d.eval_json_path
        return sources_lib.json_mixture(path, d.image_folder, d.weights if split == "train" else "",
                                        seed=d.shuffle_seed)
    if kind == "arrayrecord":
        directory = d.arrayrecord_dir if split == "train" else d.eval_arrayrecord_dir
        if not directory:
            raise ValueError(f"data.source='arrayrecord' needs data.{'arrayrecord_dir' if split == 'train' else 'eval_arrayrecord_dir'}")
        return sources_lib.ArrayRecordSource(directory, split="train")
    raise ValueError(f"unknown data.source {kind!r}; expected 'synthetic', 'json' or 'arrayrecord'")


def make_train_iterator(config, tokenizer, model_config, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, split: str = "train",
                        num_epochs: Optional[int] = None) -> BatchIterator:
    """The iterator the training loop calls: this host's share of each global batch, endless for
    'train' (reshuffled every epoch), one unshuffled pass for 'eval'. `.get_state()/.set_state()`
    resume it; `.skips` counts what was skipped (`.skips.summary()`)."""
    import jax

    from llava_jax.models.config import config_from_any

    mc = config_from_any(model_config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    global_batch = config.global_batch_size
    if global_batch % process_count:
        raise ValueError(f"global_batch_size={global_batch} is not divisible by {process_count} processes")
    d = config.data
    max_length = config.max_length
    sample_spec = SampleSpec(template=d.template, image_aspect=d.image_aspect, image_size=mc.vision.image_size,
                             image_token_id=mc.image_token_id, num_image_tokens=mc.num_image_tokens,
                             max_length=max_length, max_images_per_row=d.max_images_per_row,
                             grid_pinpoints=mc.image_grid_pinpoints, patch_size=mc.vision.patch_size)
    batch_spec = BatchSpec(batch_size=global_batch // process_count, max_length=max_length,
                           image_size=mc.vision.image_size, max_images_per_row=d.max_images_per_row,
                           packing=d.packing, pad_token_id=mc.pad_token_id, strict=d.strict,
                           num_tiles=anyres.max_tiles(mc.image_grid_pinpoints, mc.vision.image_size)
                           if mc.anyres else 0)
    is_train = split == "train"
    return build_iterator(
        make_source(config, mc, split), tokenizer, sample_spec, batch_spec,
        seed=d.shuffle_seed, shuffle=is_train, num_epochs=num_epochs if is_train else 1,
        process_index=process_index, process_count=process_count, num_workers=d.num_workers,
        group_by_modality_length=d.group_by_modality_length and is_train)


def to_global(batch: dict, mesh_or_shardings) -> dict:
    """This host's numpy batch -> global jax.Arrays (leading axis split over the batch mesh axes, or
    over the given sharding / dict of shardings) via jax.make_array_from_process_local_data."""
    import jax
    from jax.sharding import Mesh

    from llava_jax import sharding as sharding_lib

    out = {}
    for key, local in batch.items():
        if isinstance(mesh_or_shardings, Mesh):
            target = sharding_lib.batch_sharding(mesh_or_shardings, np.ndim(local))
        elif isinstance(mesh_or_shardings, dict):
            target = mesh_or_shardings[key]
        else:
            target = mesh_or_shardings
        out[key] = jax.make_array_from_process_local_data(target, np.asarray(local))
    return out
