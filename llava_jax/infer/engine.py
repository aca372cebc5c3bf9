"""Continuous batching: a fixed set of decode slots that requests enter and leave between steps.

The design of JetStream's engine and vLLM's iteration-level scheduling, on the model's KV cache:
- the engine owns one cache of `max_batch` rows (a row = a decode slot) and `T` slots;
- a waiting request is *prefilled* on its own small cache (the Generator's jitted `_prefill`: image
  features, prompt, first token, which streams at once), then *inserted* into a free row between two
  decode steps. As in JetStream, prefill does not wait for a free row: up to `prefill_ahead`
  requests beyond the free rows are prefilled ahead and held (their small caches) until rows free
  up, oldest first, so under load a request's first token comes after the prefills queued before
  it rather than after the running answers (its second token then waits for the row);
- every decode step runs all `max_batch` rows (a free row decodes garbage nobody reads: static
  shapes; decoding only a leading block of rows, through a slice of the cache written back in
  place, measured slower on XLA:CPU than all 8 rows: BENCHMARKS.md §6); a row that finishes
  (EOS, stop, max_tokens, cancelled, timed out) frees its slot at once,
  and the next waiting request may take it before the next step.

One write index for all rows. The model's cache has one `index` (the next slot every row writes):
rows differ by their RoPE positions and their segment ids (slots of segment 0 are never attended),
not by where they write. A request is inserted right-aligned, its prompt ending at `index - 1`, so
from then on it decodes in lock-step with the others; the slots before its prompt are masked out.
When the index would run past the end of the cache, the cache is *rebased*: every row is rolled
left by the start of the oldest live row (one copy of the cache). When a prompt is longer than the
index, the rows are rolled right first. The cache grows through a few lengths (`cache_lengths`) as
the rows need them, and starts again at the smallest when the engine falls idle, so attention reads
about as many slots as the longest live row needs.

Compiled shapes (all bounded, compiled on first use; `precompile()` compiles the greedy decode
shapes up front): decode: one per (cache length, sampling on/off, sampling filter width), always
`max_batch` rows; prefill: the Generator's buckets (rows 1, 2, 4 ... max_batch x
prompt bucket x image-count bucket); insert: (prefill rows, prompt bucket, cache length); rebase:
one per cache length; grow: one per pair of consecutive cache lengths. LLaVA-1.6 (AnyRes) requests
carry `image_sizes`; `submit` checks them (`generate.prepare_images`) and their layouts enter the
prefill as data, so image sizes add no compiled shapes.

Greedy answers equal the single-request answers of `Generator.generate` (same prefill buckets,
same per-row computation); a sampled row draws with its own seed folded with its step number, as
there.

Threading: `submit` and `Request.cancel` may be called from any thread; the decode loop runs in
the engine's own thread (`start()`), or step by step with `step()` (tests, batch jobs).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.infer.generate import (TRACE_COUNTS, _StopMatcher, _as_int_list, _choose_tokens, _round_up,
                                      batch_bucket, filter_width, image_tokens_note, pad_images,
                                      prepare_images, prompt_bucket)
from llava_jax.models.llama import extend_cache

MIN_CACHE_LENGTH = 128
DEFAULT_MAX_QUEUE = 64


class QueueFull(Exception):
    """The waiting queue is at its bound: try again later (HTTP 429 with Retry-After)."""


class EngineClosed(Exception):
    """The engine was closed (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One answer to generate. `on_event(kind, value)` is called from the engine thread with
    ('token', id) for every answer token but EOS, then once ('done', reason) with reason 'eos',
    'stop', 'length', 'cancelled' or 'timeout', or ('error', message)."""

    input_ids: np.ndarray
    pixels: Optional[np.ndarray] = None
    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence = ()  # strings (need the engine's tokenizer) and/or token-id sequences
    on_event: Optional[Callable] = None
    timeout_s: Optional[float] = None  # from submit to the last token; then it ends with 'timeout'
    # AnyRes (LLaVA-1.6) models: (n, 2) original (height, width) of each image; pixels are then
    # (n, P, H, W, 3) tiles (`llava_jax.infer.generate.prepare_images`)
    image_sizes: Optional[np.ndarray] = None
    # filled by the engine
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    submitted_at: float = 0.0
    first_token_at: Optional[float] = None
    _layouts: Optional[np.ndarray] = None  # AnyRes: the checked images' layouts
    _cancelled: bool = False
    _done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self):
        """Stop generating (a client left): the slot is freed before the next decode step."""
        self._cancelled = True

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)


@dataclasses.dataclass(eq=False)
class _Prefilled:
    """One prefill call's cache (its rows x its prompt bucket), shared by the requests it holds."""
    cache: dict
    prompt: int


@dataclasses.dataclass(eq=False)
class _Ready:
    """A prefilled request (its first token chosen and streamed) waiting for a decode slot."""
    request: Request
    matcher: _StopMatcher
    prefilled: _Prefilled
    source: int  # its row in prefilled.cache
    token: int
    position: int


@dataclasses.dataclass
class _Slot:
    request: Request
    matcher: _StopMatcher
    token: int  # the last chosen token: the next step's input
    position: int  # its RoPE position
    start: int  # the first cache slot of this row's span (prompt bucket + answer so far)


def max_prompt_padding(max_context: int) -> int:
    """The most left padding `prompt_bucket` adds to a prompt of at most `max_context` tokens."""
    return max(prompt_bucket(n) - n for n in range(1, max_context + 1))


# ----- the jitted pieces ----------------------------------------------------------------------

def _decode_steps(graphdef, state, cache, tokens, positions, steps, temperature, top_k, top_p, seeds, *,
                  num_steps, sample, width=0):
    """`num_steps` decode steps of every row -> (chosen tokens (B, num_steps), cache)."""
    TRACE_COUNTS["engine_decode"] += 1
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    ones = jnp.ones((batch, 1), jnp.int32)
    sampling = (temperature, top_k, top_p, jax.vmap(jax.random.key)(seeds))

    def body(i, carry):
        token, position, cache, out = carry
        logits, cache = model(token[:, None], None, ones, segment_ids=ones, positions=position[:, None],
                              cache=cache)
        chosen = _choose_tokens(logits[:, -1].astype(jnp.float32), sampling, steps + i, sample, width)
        return chosen, position + 1, cache, out.at[:, i].set(chosen)

    out = jnp.zeros((batch, num_steps), jnp.int32)
    _, _, cache, out = jax.lax.fori_loop(0, num_steps, body, (tokens, positions, cache, out))
    return out, cache


def _insert(cache, prefilled, sources, rows, count, index):
    """Copy rows `sources[:count]` of a prefill cache (P slots) into engine rows `rows[:count]`, at
    slots [index - P, index); the rest of each target row's segment is cleared (its old occupant's
    keys stay but are never attended)."""
    TRACE_COUNTS["engine_insert"] += 1
    prompt = prefilled["segment"].shape[1]
    kv_heads = cache["layers"][0].k.shape[0] // cache["segment"].shape[0]

    def body(i, cache):
        row, source, start = rows[i], sources[i], index - prompt

        def put(big, small):
            piece = jax.lax.dynamic_slice_in_dim(small, source * kv_heads, kv_heads, axis=0)
            return jax.lax.dynamic_update_slice(big, piece.astype(big.dtype), (row * kv_heads, start, 0))

        layers = jax.tree.map(put, cache["layers"], prefilled["layers"])
        segment = jax.lax.dynamic_update_slice(cache["segment"], jnp.zeros((1, cache["segment"].shape[1]),
                                                                            jnp.int32), (row, 0))
        new = jax.lax.dynamic_slice_in_dim(prefilled["segment"], source, 1, axis=0)
        segment = jax.lax.dynamic_update_slice(segment, new, (row, start))
        return dict(cache, layers=layers, segment=segment)

    return jax.lax.fori_loop(0, count, body, cache)


def _rebase(cache, shift, new_index):
    """Roll every row by `shift` slots (negative: left) and set the write index; slots that wrap
    around are cleared."""
    TRACE_COUNTS["engine_rebase"] += 1
    roll = functools.partial(jnp.roll, shift=shift, axis=-2)
    segment = jnp.roll(cache["segment"], shift, axis=1)
    slots = jnp.arange(segment.shape[1])
    keep = (slots < new_index) & (slots >= jnp.maximum(shift, 0))
    return dict(layers=jax.tree.map(roll, cache["layers"]), segment=jnp.where(keep[None], segment, 0),
                index=jnp.asarray(new_index, jnp.int32))


# ----- the engine ------------------------------------------------------------------------------

class Engine:
    """Decode slots over a `Generator`'s model (and mesh).

    max_batch: decode slots. prefill_ahead: prefilled requests that may wait for a slot (default
    max_batch; 0: prefill only into free slots). chunk_size: decode steps per jitted call (1: a row
    that finishes or is cancelled frees its slot before the next step). max_queue: waiting requests
    beyond which `submit` raises QueueFull. max_context: the longest prompt + answer a request may
    ask for (default: the model's max_position_embeddings). eos_ids / pad_id default to the model
    config's; tokenizer is needed for stop strings.
    """

    def __init__(self, generator, *, max_batch: int = 8, chunk_size: int = 1, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_context: Optional[int] = None, eos_ids=None, pad_id: Optional[int] = None, tokenizer=None,
                 max_prefill_rows: Optional[int] = None, prefill_ahead: Optional[int] = None):
        self.generator = gen = generator
        self.config = gen.config
        self.max_batch, self.chunk_size, self.max_queue = int(max_batch), int(chunk_size), int(max_queue)
        self.max_prefill_rows = int(max_prefill_rows or max_batch)
        self.prefill_ahead = int(self.max_batch if prefill_ahead is None else prefill_ahead)
        self.max_context = int(max_context or self.config.text.max_position_embeddings)
        text = self.config.text
        self.eos_ids = _as_int_list(text.eos_token_id if eos_ids is None else eos_ids)
        self.pad_id = int(self.config.pad_token_id if pad_id is None else pad_id)
        self.tokenizer = tokenizer
        longest = _round_up(self.max_context + max_prompt_padding(self.max_context) + self.chunk_size,
                            MIN_CACHE_LENGTH)
        lengths = [MIN_CACHE_LENGTH]
        while lengths[-1] * 2 < longest:
            lengths.append(lengths[-1] * 2)
        self.cache_lengths = tuple(lengths) + ((longest,) if lengths[-1] < longest else ())

        self._decode = jax.jit(functools.partial(_decode_steps, gen.graphdef),
                               static_argnames=("num_steps", "sample", "width"), donate_argnames=("cache",))
        self._insert = jax.jit(_insert, donate_argnames=("cache",))
        self._rebase = jax.jit(_rebase, donate_argnames=("cache",))
        self._grow = jax.jit(extend_cache, static_argnames=("max_length",))  # a new, larger buffer
        model = nnx.merge(gen.graphdef, gen.state)
        self._new_cache = jax.jit(lambda length: model.init_cache(self.max_batch, length),
                                  static_argnums=0)

        self.slots: list = [None] * self.max_batch
        self.cache = None
        self.index = 0  # host copy of the cache's write index
        self._waiting: collections.deque = collections.deque()
        self._ready: collections.deque = collections.deque()  # of _Ready, oldest first
        self._cond = threading.Condition()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        # steps, prefills, rebases, grows, requests, finished_<reason>, prefill_seconds / decode_seconds
        # (wall time in those calls, device work included)
        self.stats = collections.Counter()

    # -- public
    def capacity(self, prompt_length: int) -> int:
        """The most new tokens a prompt of this length can get from the cache (and the context)."""
        by_cache = self.cache_lengths[-1] - self.chunk_size - prompt_bucket(prompt_length)
        return max(0, min(by_cache, self.max_context - int(prompt_length)))

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def prefilled_waiting(self) -> int:
        """Requests prefilled ahead (first token sent) that wait for a slot."""
        return len(self._ready)

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def submit(self, request: Request) -> Request:
        """Queue a request (checked here: a bad one raises ValueError, a full queue QueueFull)."""
        self._check(request)
        request.submitted_at = time.monotonic()
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound is {self.max_queue})")
            self._waiting.append(request)
            self.stats["requests"] += 1
            self._cond.notify()
        return request

    def precompile(self) -> int:
        """Compile the greedy decode step for every cache length now, before `start()`,
        so that no request waits for one of those compiles later -> how many shapes. (Prefill shapes
        and sampled decoding still compile on first use.)"""
        if self._thread is not None:
            raise RuntimeError("precompile() before start(): the engine thread owns the cache")
        inputs = self._row_inputs()  # every row free: what a greedy step passes, same shapes and dtypes
        with self._mesh():
            for length in self.cache_lengths:
                self._decode(self.generator.state, self._new_cache(length), *inputs, num_steps=self.chunk_size,
                             sample=False, width=0)
        return len(self.cache_lengths)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="llava-jax-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0):
        """Stop the loop; requests still waiting or decoding end with an error event."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in (list(self._waiting) + [ready.request for ready in self._ready]
                        + [s.request for s in self.slots if s is not None]):
            self._finish_error(request, "the server is shutting down")
        self._waiting.clear()
        self._ready.clear()
        self.slots = [None] * self.max_batch

    def run_until_done(self, requests: Sequence[Request]) -> list:
        """Submit `requests` and step until all are finished (no thread) -> their token lists."""
        for r in requests:
            self.submit(r)
        while not all(r.finished for r in requests):
            self.step()
        return [r.tokens for r in requests]

    # -- the loop
    def _run(self):
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._ready and self.busy_slots == 0:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails the requests in it, not the engine
                message = f"generation failed: {type(e).__name__}: {e}"
                for slot in self.slots:
                    if slot is not None:
                        self._finish_error(slot.request, message)
                self.slots = [None] * self.max_batch
                self.cache = None

    def step(self) -> bool:
        """Drop cancelled / timed-out requests, admit waiting ones into free slots (prefill + insert),
        then run one decode call. -> whether any row decoded."""
        self._reap()
        with self._mesh():
            self._admit()
            if self.busy_slots == 0:
                if self.cache is not None and not self._waiting and not self._ready:
                    self.cache, self.index = None, 0  # idle: start small again
                return False
            self._decode_once()
        return True

    # -- pieces of a step
    def _mesh(self):
        return self.generator._mesh_context() if self.generator.mesh is not None else contextlib.nullcontext()

    def _check(self, request: Request):
        ids = np.asarray(request.input_ids, np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("input_ids is empty")
        request.input_ids = ids
        pixels = request.pixels
        if pixels is not None:
            pixels = np.asarray(pixels, np.float32)
            if pixels.ndim == 3 or (self.config.anyres and pixels.ndim == 4):
                pixels = pixels[None]  # one image
        sizes = request.image_sizes
        if sizes is not None and np.ndim(sizes) == 1:
            sizes = np.asarray(sizes)[None]
        mask = np.ones((1, ids.size), np.int32)
        request.pixels, request._layouts = prepare_images(self.config, ids[None], mask, pixels, sizes)
        if int(request.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        room = self.capacity(ids.size)
        if request.max_tokens > room:
            raise ValueError(f"a prompt of {ids.size} tokens{image_tokens_note(self.config, ids)} leaves room for "
                             f"{room} new tokens in this engine's cache (max_context {self.max_context}); "
                             f"max_tokens asks for {request.max_tokens}")
        if request.temperature < 0 or request.top_k < 0 or not 0 < request.top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        _StopMatcher(request.stop, self.tokenizer)  # raises on a stop string without a tokenizer

    def _reap(self):
        now = time.monotonic()

        def why_ended(r: Request):
            if r._cancelled:
                return "cancelled"
            if r.timeout_s is not None and now - r.submitted_at > r.timeout_s:
                return "timeout"
            return None

        for row, slot in enumerate(self.slots):
            if slot is not None and why_ended(slot.request):
                self._free(row, why_ended(slot.request))
        with self._cond:
            ended = [r for r in self._waiting if why_ended(r)]
            for r in ended:
                self._waiting.remove(r)
        gone = [ready for ready in self._ready if why_ended(ready.request)]
        for ready in gone:
            self._ready.remove(ready)
        for r in ended + [ready.request for ready in gone]:
            self._finish(r, why_ended(r))

    def _admit(self):
        """Prefill waiting requests, as many as there are free rows plus up to `prefill_ahead` more
        (every first token streams now; the extra requests wait, prefilled, for a row), then move the
        oldest prefilled requests into the free rows."""
        free = [row for row, slot in enumerate(self.slots) if slot is None]
        with self._cond:
            room = max(0, len(free) + self.prefill_ahead - len(self._ready))
            take = min(room, self.max_prefill_rows, len(self._waiting))
            requests = [self._waiting.popleft() for _ in range(take)]
        # One prefill per prompt bucket: a short text prompt is not padded to an image prompt's length.
        groups = collections.defaultdict(list)
        for request in requests:
            groups[prompt_bucket(request.input_ids.size)].append(request)
        for group in groups.values():
            self._prefill_group(group)
        moving = [self._ready.popleft() for _ in range(min(len(free), len(self._ready)))]
        # one insert per prefill call: its rows go in together
        by_prefill = collections.defaultdict(list)
        for ready in moving:
            by_prefill[ready.prefilled].append(ready)
        for prefilled, readies in by_prefill.items():
            self._insert_ready(prefilled, readies, free[:len(readies)])
            free = free[len(readies):]

    def _prefill_group(self, requests):
        started = time.perf_counter()
        try:
            first, positions, cache, prompt = self._prefill(requests)
        except Exception as e:  # e.g. a shape the model cannot take: fail these requests only
            for r in requests:
                self._finish_error(r, f"prefill failed: {type(e).__name__}: {e}")
            return
        self.stats["prefills"] += 1
        self.stats["prefill_seconds"] += time.perf_counter() - started  # np.asarray(first) waited for it
        prefilled = _Prefilled(cache, prompt)
        for i, request in enumerate(requests):
            ready = _Ready(request, _StopMatcher(request.stop, self.tokenizer), prefilled, i, int(first[i]),
                           int(positions[i]))
            reason = self._take(request, ready.matcher, ready.token)
            if reason is None:
                self._ready.append(ready)
            else:  # it ended on its first token
                self._finish(request, reason)

    def _insert_ready(self, prefilled: _Prefilled, readies, rows):
        self._make_room(prefilled.prompt)
        width = prefilled.cache["segment"].shape[0]
        sources, targets = np.zeros((width,), np.int32), np.zeros((width,), np.int32)
        sources[:len(rows)] = [r.source for r in readies]
        targets[:len(rows)] = rows
        self.cache = self._insert(self.cache, prefilled.cache, jnp.asarray(sources), jnp.asarray(targets),
                                  jnp.int32(len(rows)), jnp.int32(self.index))
        for row, ready in zip(rows, readies):
            self.slots[row] = _Slot(ready.request, ready.matcher, ready.token, ready.position,
                                    self.index - prefilled.prompt)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.busy_slots)

    def _prefill(self, requests):
        gen = self.generator
        rows = batch_bucket(len(requests))
        prompt = prompt_bucket(max(r.input_ids.size for r in requests))
        ids = np.full((rows, prompt), self.config.pad_token_id, np.int32)
        mask = np.zeros((rows, prompt), np.int32)
        mask[len(requests):, -1] = 1  # filler rows get one real token so their attention is defined
        for i, r in enumerate(requests):
            ids[i, prompt - r.input_ids.size:] = r.input_ids
            mask[i, prompt - r.input_ids.size:] = 1
        with_images = [r for r in requests if r.pixels is not None]
        pixels = layouts = None
        if with_images:
            pixels = np.concatenate([r.pixels for r in with_images])
            if self.config.anyres:
                layouts = np.concatenate([r._layouts for r in with_images])
            pixels, layouts = pad_images(pixels, layouts)

        def per_row(name, fill, dtype):
            values = [getattr(r, name) for r in requests] + [fill] * (rows - len(requests))
            return np.asarray(values, dtype)

        temperature = per_row("temperature", 0, np.float32)
        top_k, top_p = per_row("top_k", 0, np.int32), per_row("top_p", 1, np.float32)
        sample = bool(np.any(temperature > 0))
        width = filter_width(temperature, top_k, top_p, self.config.text.vocab_size) if sample else 0
        keys = jax.vmap(jax.random.key)(per_row("seed", 0, np.uint32))
        first, positions, cache = gen._prefill(gen.state, ids, mask, pixels, layouts,
                                               (temperature, top_k, top_p, keys), cache_length=prompt,
                                               sample=sample, width=width)
        return np.asarray(first), np.asarray(positions), cache, prompt

    def _cache_length_for(self, needed: int) -> int:
        for length in self.cache_lengths:
            if length >= needed:
                return length
        raise RuntimeError(f"{needed} cache slots needed; the engine's largest cache has "
                           f"{self.cache_lengths[-1]} (a request past capacity() got in)")

    def _make_room(self, prompt: int):
        """Before inserting a prompt bucket of `prompt` slots: a cache, the index at >= prompt."""
        if self.cache is None or self.busy_slots == 0:
            if self.cache is None or self.cache["segment"].shape[1] < prompt + self.chunk_size:
                self.cache, self.index = self._new_cache(self._cache_length_for(prompt + self.chunk_size)), 0
            self._set_index(prompt - self.index)
            return
        if self.index < prompt:
            self._ensure_length(prompt + self.chunk_size)
            self._set_index(prompt - self.index)

    def _ensure_length(self, needed: int):
        length = self.cache["segment"].shape[1]
        if needed > length:
            self.cache = self._grow(self.cache, max_length=self._cache_length_for(needed))
            self.stats["grows"] += 1

    def _set_index(self, shift: int):
        """Roll every row by `shift` slots (the live rows keep their order and content)."""
        if shift == 0:
            return
        self.index += shift
        self.cache = self._rebase(self.cache, jnp.int32(shift), jnp.int32(self.index))
        for slot in self.slots:
            if slot is not None:
                slot.start += shift
        self.stats["rebases"] += 1

    def _decode_once(self):
        steps_ahead = self.chunk_size
        if self.index + steps_ahead > self.cache["segment"].shape[1]:
            oldest = min(s.start for s in self.slots if s is not None)
            if oldest > 0:
                self._set_index(-oldest)
            self._ensure_length(self.index + steps_ahead)
        active = [row for row, s in enumerate(self.slots) if s is not None]
        tokens, positions, steps, temperature, top_k, top_p, seeds = self._row_inputs()
        sample = bool(np.any(temperature > 0))
        width = filter_width(temperature, top_k, top_p, self.config.text.vocab_size) if sample else 0
        started = time.perf_counter()
        out, self.cache = self._decode(self.generator.state, self.cache, tokens, positions, steps, temperature,
                                       top_k, top_p, seeds, num_steps=steps_ahead, sample=sample, width=width)
        self.index += steps_ahead
        self.stats["steps"] += steps_ahead
        out = np.asarray(out)
        self.stats["decode_seconds"] += time.perf_counter() - started
        for row in active:
            slot = self.slots[row]
            for i in range(steps_ahead):
                if self.slots[row] is not slot:
                    break
                self._record(row, int(out[row, i]))
            if self.slots[row] is slot:
                slot.token, slot.position = int(out[row, -1]), slot.position + steps_ahead

    def _row_inputs(self) -> tuple:
        """The decode step's per-row arrays (tokens, positions, steps, temperature, top_k, top_p, seeds);
        a free row gets the pad token and greedy settings."""
        tokens = np.full((self.max_batch,), self.pad_id, np.int32)
        positions = np.zeros((self.max_batch,), np.int32)
        steps = np.zeros((self.max_batch,), np.int32)
        temperature = np.zeros((self.max_batch,), np.float32)
        top_k = np.zeros((self.max_batch,), np.int32)
        top_p = np.ones((self.max_batch,), np.float32)
        seeds = np.zeros((self.max_batch,), np.uint32)
        for row, s in enumerate(self.slots):
            if s is None:
                continue
            r = s.request
            # a row's step number = tokens chosen so far (the Generator's numbering: prefill is 0)
            tokens[row], positions[row], steps[row] = s.token, s.position, len(r.tokens)
            temperature[row], top_k[row], top_p[row], seeds[row] = r.temperature, r.top_k, r.top_p, r.seed
        return tokens, positions, steps, temperature, top_k, top_p, seeds

    # -- per-row bookkeeping
    def _record(self, row: int, token: int):
        """One chosen token of the row's request: stream it, or end the request and free the row."""
        slot = self.slots[row]
        reason = self._take(slot.request, slot.matcher, token)
        if reason is not None:
            self._free(row, reason)

    def _take(self, r: Request, matcher: _StopMatcher, token: int) -> Optional[str]:
        """Stream `token` to the request -> why it ends with it ('eos', 'stop', 'length') or None
        (the caller finishes it)."""
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
        if token in self.eos_ids:
            return "eos"
        r.tokens.append(token)
        self._emit(r, "token", token)
        if matcher and matcher.matches(r.tokens):
            return "stop"
        if len(r.tokens) >= r.max_tokens:
            return "length"
        return None

    def _free(self, row: int, reason: str):
        request = self.slots[row].request
        self.slots[row] = None
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str):
        request.finish_reason = reason
        self.stats[f"finished_{reason}"] += 1
        self._emit(request, "done", reason)
        request._done.set()

    def _finish_error(self, request: Request, message: str):
        request.error = message
        self.stats["finished_error"] += 1
        self._emit(request, "error", message)
        request._done.set()

    @staticmethod
    def _emit(request: Request, kind: str, value):
        if request.on_event is not None:
            try:
                request.on_event(kind, value)
            except Exception:  # a listener that went away (closed event loop) must not stop the engine
                pass
