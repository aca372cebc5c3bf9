"""Text generation with a KV cache: bucketed prefill, chunked jitted decode, sampling and stopping.

The model is split once into (graphdef, state); two functions, jitted per Generator with the
graphdef bound (a static graphdef argument would be hashed on every call: milliseconds for an
unstacked model), take the state:
- `_prefill` runs the (left-padded) prompt through the model, filling a fresh cache, and samples the
  first new token;
- `_decode_chunk` runs up to `chunk_size` decode steps in a `lax.while_loop` (it exits early once
  every row is finished), so Python regains control every few tokens to stream them and to check
  stop strings, without paying a dispatch per token.
Shapes are bucketed (batch rows, prompt length, image count, cache length) so a new prompt length
inside a bucket reuses the compiled code. LLaVA-1.6 (AnyRes) images enter as tiles padded to the
config's static tile count with their per-image layouts (`prepare_images`): layouts are traced data,
so images of any size share the compiled prefill of their bucket. Decode attention reads every slot
of the cache, so the cache holds the prompt and `cache_growth` new tokens and grows by as many
between chunks when the answer needs them (`llama.extend_cache`).
"""
from __future__ import annotations

import collections
import functools
import weakref
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.data import anyres
from llava_jax.models import llava_next
from llava_jax.models.layout import DecoderLayout
from llava_jax.models.llama import extend_cache
from llava_jax.models.llava import with_layout

# How often each jitted function body was traced (i.e. compiled), by name: tests read it to prove
# that prompts of different lengths inside a bucket do not recompile.
TRACE_COUNTS: collections.Counter = collections.Counter()

DEFAULT_CHUNK_SIZE = 8
_MIN_PROMPT_BUCKET = 32
_NEW_TOKENS_ROUNDING = 64
# Decode attention reads every slot of the cache, filled or not, so the cache starts with room for
# this many new tokens and grows by as many (a copy of the cache, every this many tokens) as the
# answer gets longer: a long max_new_tokens costs nothing until the answer is long.
DEFAULT_CACHE_GROWTH = 256


# ----- buckets --------------------------------------------------------------------------------

def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# (largest length, rounding) pairs: padding wastes at most ~20% past 320 tokens (prefill time is
# roughly linear in the padded length) while the number of compiled prompt shapes stays small.
_PROMPT_BUCKET_STEPS = ((512, 64), (1024, 128), (2048, 256))


def prompt_bucket(length: int) -> int:
    """Padded prompt length: 32, then multiples of 64 up to 512, of 128 up to 1024, of 256 up to
    2048, then of 512."""
    if length <= _MIN_PROMPT_BUCKET:
        return _MIN_PROMPT_BUCKET
    for limit, multiple in _PROMPT_BUCKET_STEPS:
        if length <= limit:
            return _round_up(length, multiple)
    return _round_up(length, 512)


def batch_bucket(rows: int) -> int:
    return _next_power_of_two(rows)


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


# ----- sampling -------------------------------------------------------------------------------

_ARGMAX_BLOCK = 128


def greedy_tokens(logits):
    """argmax over the last axis of (B, V) logits -> int32 (B,), the first index among equal maxima.

    In two stages, the best block of 128 then the best entry inside it: XLA:CPU's variadic-reduce
    argmax over a 32000-entry row runs ~10x slower than these max reductions (~0.6 ms of a 20 ms
    batch-8 decode step)."""
    rows, vocab = logits.shape
    padded = _round_up(vocab, _ARGMAX_BLOCK)
    if padded != vocab:
        logits = jnp.pad(logits, ((0, 0), (0, padded - vocab)), constant_values=-jnp.inf)
    blocks = logits.reshape(rows, padded // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best_block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, best_block[:, None, None], axis=1)[:, 0]
    return (best_block * _ARGMAX_BLOCK + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


_MIN_FILTER_WIDTH = 64  # one compiled width for the usual top-k values
_NUCLEUS_WIDTH = 1024  # a top-p nucleus without a top-k rarely spans more tokens


def filter_width(temperature, top_k, top_p, vocab: int) -> int:
    """How many of each row's largest logits the sampling filter ranks (a static shape): 0 when no
    sampled row filters; else a power of two >= every sampled row's top_k, at least 64, and at
    least 1024 when a row has a top-p nucleus but no top-k; at most the vocabulary."""
    sampled = np.asarray(temperature) > 0
    top_k, top_p = np.asarray(top_k)[sampled], np.asarray(top_p)[sampled]
    if not np.any((top_k > 0) | (top_p < 1)):
        return 0
    width = max(_MIN_FILTER_WIDTH, _next_power_of_two(int(top_k.max())))
    if np.any((top_k == 0) & (top_p < 1)):
        width = max(width, _NUCLEUS_WIDTH)
    return min(width, vocab)


def _filter_top_k_top_p(logits, top_k, top_p, width=None):
    """Mask (to -inf) the logits outside each row's top-k, then outside its top-p nucleus.

    top_k (B,) int: 0 = off. top_p (B,) float: 1.0 = off. Same order as transformers' warpers.
    Only the `width` largest logits of a row are ranked (a partial sort: ranking all 32000 took
    longer than a batch-8 decode step); when a row's nucleus reaches past them, or a top_k past
    `width`, the whole vocabulary is ranked instead (`lax.cond`), so the result never depends on
    `width`.
    """
    vocab = logits.shape[-1]
    width = vocab if width is None else min(width, vocab)
    filtered, ranked_enough = _filter_ranked(logits, top_k, top_p, width)
    if width == vocab:
        return filtered
    return jax.lax.cond(jnp.all(ranked_enough), lambda: filtered,
                        lambda: _filter_ranked(logits, top_k, top_p, vocab)[0])


def _filter_ranked(logits, top_k, top_p, width):
    """`_filter_top_k_top_p` from each row's `width` largest logits -> (filtered logits, per row
    whether those were enough: its top_k fits and its nucleus ends inside them)."""
    descending = jax.lax.top_k(logits, width)[0]
    kth = jnp.take_along_axis(descending, (jnp.clip(top_k, 1, width) - 1)[:, None], axis=-1)
    kth = jnp.where((top_k > 0)[:, None], kth, -jnp.inf)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    # probabilities over the whole (top-k masked) vocabulary, of the ranked tokens only
    probs = jnp.exp(descending - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # A token stays while the mass of the tokens ranked above it is below p (the top one always).
    keep = jnp.sum(mass_before < top_p[:, None], axis=-1)
    threshold = jnp.take_along_axis(descending, (jnp.maximum(keep, 1) - 1)[:, None], axis=-1)
    threshold = jnp.where((top_p < 1)[:, None], threshold, -jnp.inf)
    enough = (top_k <= width) & ((top_p >= 1) | (keep < width) | (width == logits.shape[-1]))
    return jnp.where(logits < threshold, -jnp.inf, logits), enough


def _choose_tokens(logits, sampling, step, sample: bool, width: int = 0):
    """Next token per row: argmax where temperature == 0, else a draw from the filtered softmax.

    width: the `filter_width` of the sampled rows (0: no top-k/top-p filter to apply).
    Each row has its own key, folded with the step number, so a row's draws depend only on its seed
    and position in the answer (not on the batch it shares or on the chunk size). `step` is one
    number for all rows or one per row (the engine's rows are at different steps of their answers).
    """
    greedy = greedy_tokens(logits)
    if not sample:
        return greedy
    temperature, top_k, top_p, keys = sampling
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    filtered = _filter_top_k_top_p(scaled, top_k, top_p, width) if width else scaled
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys.shape)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    drawn = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


# ----- the jitted pieces ----------------------------------------------------------------------

def _prefill(graphdef, state, input_ids, attention_mask, pixel_values, layouts, sampling, *, cache_length, sample,
             width=0):
    """layouts: AnyRes images' int32 (N, 5) layouts (`prepare_images`), None for LLaVA-1.5."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    batch = input_ids.shape[0]
    cache = model.init_cache(batch, cache_length)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
    hidden, cache = model.hidden_states(input_ids, pixel_values, attention_mask, segment_ids=attention_mask,
                                        positions=positions, cache=cache, image_sizes=layouts)
    # Only the last position is sampled: the vocabulary projection of the others would cost as
    # much as several decoder layers.
    logits = model.logits_from_hidden(hidden[:, -1:])
    first = _choose_tokens(logits[:, -1], sampling, 0, sample, width)
    return first, positions[:, -1] + 1, cache


def _decode_chunk(graphdef, state, cache, token, position, done, count, limits, first_step, sampling,
                  eos_ids, pad_id, *, num_steps, sample, width=0):
    """Feed `token` (the last chosen token per row) and choose up to `num_steps` more.

    Returns the chosen tokens (B, num_steps) (pad where a row was already finished or the loop
    stopped early), the number of steps run, and the carried decode state.
    """
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)
    batch = token.shape[0]
    ones = jnp.ones((batch, 1), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < num_steps) & ~jnp.all(done)

    def body(carry):
        step, token, position, cache, done, count, out = carry
        logits, cache = model(token[:, None], None, ones, segment_ids=ones, positions=position[:, None],
                              cache=cache)
        chosen = _choose_tokens(logits[:, -1].astype(jnp.float32), sampling, first_step + step, sample,
                                width)
        # Finished rows keep decoding (static shapes) but report the pad id, which need not be a
        # valid token id, so the fed-back token stays the chosen one.
        out = out.at[:, step].set(jnp.where(done, pad_id, chosen))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(chosen, eos_ids) | (count >= limits)
        return step + 1, chosen, position + 1, cache, done, count, out

    out = jnp.full((batch, num_steps), pad_id, jnp.int32)
    carry = (jnp.int32(0), token, position, cache, done, count, out)
    steps, token, position, cache, done, count, out = jax.lax.while_loop(cond, body, carry)
    return out, steps, token, position, cache, done, count


# ----- stopping on token sequences and strings --------------------------------------------------

class _StopMatcher:
    """Python-side stop criteria for one row: token-id sequences and (with a tokenizer) strings."""

    def __init__(self, stop, tokenizer):
        self.sequences, self.strings = [], []
        for item in stop or ():
            if isinstance(item, str):
                if tokenizer is None:
                    raise ValueError(f"stop string {item!r} needs a tokenizer (pass tokenizer=...)")
                if item:
                    self.strings.append(item)
            else:
                seq = [int(t) for t in item]
                if not seq:
                    raise ValueError("an empty stop token sequence would stop immediately")
                self.sequences.append(seq)
        self.tokenizer = tokenizer

    def __bool__(self):
        return bool(self.sequences or self.strings)

    def matches(self, tokens: list) -> bool:
        for seq in self.sequences:
            if tokens[-len(seq):] == seq:
                return True
        if self.strings:
            text = self.tokenizer.decode(tokens)
            return any(s in text for s in self.strings)
        return False


# ----- images ---------------------------------------------------------------------------------

def prepare_images(config, input_ids, attention_mask, pixel_values, image_sizes=None):
    """Check a batch's images against its placeholders (where attention_mask is 1) before anything
    runs -> (pixel_values float32 or None, layouts int32 (N, 5) or None).

    LLaVA-1.5: pixel_values (N, H, W, 3) or (B, M, H, W, 3); every image has
    `config.num_image_tokens` placeholders; image_sizes must be None; layouts is None.
    AnyRes (`config.anyres`): pixel_values (N, P, H, W, 3), images in placeholder order, each image's
    base tile and grid tiles then zero tiles (`anyres.preprocess_anyres`); image_sizes (N, 2) their
    original (height, width). The tile axis is padded with zero tiles to `anyres.max_tiles` (one
    compiled shape whatever P the caller used); the layouts come from the sizes
    (`llava_next.layouts_from_sizes`). Each image must have exactly `anyres.num_image_tokens(size)`
    placeholders, and every row's placeholders must end where an image's run ends. Trailing images
    no placeholder refers to are allowed (as for LLaVA-1.5)."""
    placeholders = (input_ids == config.image_token_id) & (attention_mask != 0)
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values, np.float32)
    if not config.anyres:
        if image_sizes is not None:
            raise ValueError("image_sizes is only for AnyRes (LLaVA-1.6) models; this model gives every image "
                             f"{config.num_image_tokens} placeholders")
        if pixel_values is not None and pixel_values.ndim not in (4, 5):
            raise ValueError(f"pixel_values must be (N, H, W, 3) or (B, M, H, W, 3), got shape {pixel_values.shape}")
        _check_fixed_counts(config, int(placeholders.sum()), pixel_values)
        return pixel_values, None
    count = int(placeholders.sum())
    if pixel_values is None:
        if count:
            raise ValueError(f"input_ids hold {count} image placeholder tokens (id {config.image_token_id}) "
                             f"but no pixel_values were given")
        return None, None
    tile, num_tiles = config.vision.image_size, anyres.max_tiles(config.image_grid_pinpoints, config.vision.image_size)
    if pixel_values.ndim != 5 or pixel_values.shape[2:] != (tile, tile, 3):
        raise ValueError(f"AnyRes pixel_values must be (N, tiles, {tile}, {tile}, 3) (images in placeholder order, "
                         f"from llava_jax.data.anyres.preprocess_anyres), got shape {pixel_values.shape}")
    if image_sizes is None:
        raise ValueError("AnyRes (LLaVA-1.6) models need image_sizes: the original (height, width) of each image "
                         "(llava_jax.data.anyres.preprocess_anyres returns it)")
    sizes = np.asarray(image_sizes)
    if sizes.shape != (pixel_values.shape[0], 2):
        raise ValueError(f"image_sizes must be one (height, width) per image, shape ({pixel_values.shape[0]}, 2); "
                         f"got shape {sizes.shape}")
    if pixel_values.shape[1] > num_tiles:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} tiles per image; this model's grids need at "
                         f"most {num_tiles} (base + the largest grid)")
    layouts = llava_next.layouts_from_sizes(sizes, config)
    side = tile // config.vision.patch_size
    llava_next.check_layouts(layouts, pixel_values.shape[1], side, count)
    # The flat layout hands images out row after row: a row must hold whole images.
    runs = np.concatenate([[0], np.cumsum(llava_next.tokens_per_image(layouts, side))])
    row_ends = np.cumsum(placeholders.sum(axis=1))
    split = [r for r, end in enumerate(row_ends) if end not in runs]
    if split:
        raise ValueError(f"row {split[0]}'s image placeholders end inside an image's token run (rows end after "
                         f"{row_ends.tolist()} placeholders, images after {runs[1:].tolist()}); give each image "
                         f"llava_jax.data.anyres.num_image_tokens(size) placeholders in its own row")
    if pixel_values.shape[1] < num_tiles:
        pad = np.zeros((pixel_values.shape[0], num_tiles - pixel_values.shape[1]) + pixel_values.shape[2:], np.float32)
        pixel_values = np.concatenate([pixel_values, pad], axis=1)
    return pixel_values, layouts


def _check_fixed_counts(config, placeholders: int, pixel_values):
    per_image = config.num_image_tokens
    if placeholders % per_image:
        raise ValueError(f"input_ids hold {placeholders} image placeholder tokens "
                         f"(id {config.image_token_id}), not a multiple of the "
                         f"{per_image} tokens per image")
    needed = placeholders // per_image
    if pixel_values is None:
        available = 0
    elif pixel_values.ndim == 4:
        available = pixel_values.shape[0]
    else:
        available = pixel_values.shape[0] * pixel_values.shape[1]
    if needed > available:
        raise ValueError(f"input_ids hold placeholders for {needed} image(s) but pixel_values "
                         f"has {available}")


def pad_images(pixel_values, layouts):
    """Flat images (N, ...) and their layouts (or None) padded with zero images to a power of two (the
    image-count bucket); a zero layout is an image no placeholder refers to."""
    extra = _next_power_of_two(pixel_values.shape[0]) - pixel_values.shape[0]
    if not extra:
        return pixel_values, layouts
    pixel_values = np.concatenate([pixel_values, np.zeros((extra,) + pixel_values.shape[1:], np.float32)])
    if layouts is not None:
        layouts = np.concatenate([layouts, np.zeros((extra,) + layouts.shape[1:], layouts.dtype)])
    return pixel_values, layouts


def image_tokens_note(config, input_ids) -> str:
    """' (N of them image tokens)' for messages about a prompt's length ('' without images)."""
    count = int(np.sum(np.asarray(input_ids) == config.image_token_id))
    return f" ({count} of them image tokens)" if count else ""


# ----- the generator --------------------------------------------------------------------------

def _as_int_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (int, np.integer)):
        return [int(x)]
    return [int(v) for v in x]


def _per_row(value, rows: int, dtype, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full((rows,), arr, dtype)
    if arr.shape != (rows,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({rows}), got shape {arr.shape}")
    return arr


class Generator:
    """A model prepared for generation: split once, optionally placed on a mesh.

    The generator runs its own model, built in the inference layout (`llava_jax.models.layout`:
    unstacked decoder layers, i.e. per-layer weights and KV-cache buffers, which a decode step reads
    and updates in place) and filled with the caller's parameters converted to it
    (`llava.with_layout`); the caller's model is left as it is (its arrays are shared, except the
    per-layer decoder weights). A LoRA model's adapters are merged into its kernels first.
    `cache_growth`: new-token slots of the first cache and of each extension (at least `chunk_size`).
    `fuse_projections` (default: when there is no mesh) builds each layer's q/k/v and gate/up
    projections as one matmul each (`DecoderLayout.fused`).
    `weights_dtype` 'bfloat16' or 'int8': the language model's matmul kernels held in that dtype
    (`DecoderLayout.weights`), for prefill and decode alike; 'float32' keeps them.
    `Generator(model, mesh=mesh)` places the parameters with `llava_jax.sharding.state_shardings`
    and runs every jitted call under `jax.set_mesh(mesh)`.
    """

    def __init__(self, model, mesh=None, chunk_size: int = DEFAULT_CHUNK_SIZE, weights_dtype: str = "float32",
                 fuse_projections: Optional[bool] = None, cache_growth: int = DEFAULT_CACHE_GROWTH):
        self.config = model.config
        self.weights_dtype = weights_dtype
        fuse = mesh is None if fuse_projections is None else fuse_projections
        layout = DecoderLayout(stacked=False, fused=fuse, weights=weights_dtype)
        self.graphdef, state = nnx.split(with_layout(model, layout, merge_adapters=True))
        self.mesh = mesh
        if mesh is not None:
            from llava_jax.sharding import state_shardings

            with jax.set_mesh(mesh):
                state = jax.device_put(state, state_shardings(state, mesh))
        self.state = state
        self.chunk_size = int(chunk_size)
        self.cache_growth = max(int(cache_growth), self.chunk_size)
        self._extend_cache = jax.jit(extend_cache, static_argnames=("max_length",))
        self._prefill = jax.jit(functools.partial(_prefill, self.graphdef),
                                static_argnames=("cache_length", "sample", "width"))
        self._decode_chunk = jax.jit(functools.partial(_decode_chunk, self.graphdef),
                                     static_argnames=("num_steps", "sample", "width"),
                                     donate_argnames=("cache",))

    def _mesh_context(self):
        import contextlib

        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def generate(self, input_ids, pixel_values=None, attention_mask=None, *, image_sizes=None, max_new_tokens=32,
                 temperature=0.0, top_k=0, top_p=1.0, seed=0, eos_token_id=None, pad_token_id=None,
                 stop=None, tokenizer=None, stream_callback: Optional[Callable] = None,
                 stop_per_row: Optional[Sequence] = None, return_finish_reasons: bool = False):
        """See `generate` (module level). Sampling arguments may also be given per row, and
        `stop_per_row` gives each row its own stop list (instead of `stop`). With
        `return_finish_reasons` -> (tokens, reasons): per row 'eos', 'stop' or 'length'."""
        input_ids = np.asarray(input_ids, np.int32)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        rows, length = input_ids.shape
        mask = (np.ones_like(input_ids) if attention_mask is None
                else np.asarray(attention_mask, np.int32).reshape(rows, length))
        if not np.all(mask[:, -1] == 1):
            raise ValueError("prompts must be left-padded: the last position of every row must be a "
                             "real token (attention_mask[:, -1] == 1)")
        pixel_values, layouts = prepare_images(self.config, input_ids, mask, pixel_values, image_sizes)
        limits = _per_row(max_new_tokens, rows, np.int32, "max_new_tokens")
        if np.any(limits < 1):
            raise ValueError(f"max_new_tokens must be >= 1, got {limits.tolist()}")
        width = int(limits.max())
        eos_ids = _as_int_list(self.config.text.eos_token_id if eos_token_id is None else eos_token_id)
        pad_id = int(self.config.pad_token_id if pad_token_id is None else pad_token_id)
        temperature = _per_row(temperature, rows, np.float32, "temperature")
        top_k = _per_row(top_k, rows, np.int32, "top_k")
        top_p = _per_row(top_p, rows, np.float32, "top_p")
        seeds = _per_row(seed, rows, np.uint32, "seed")
        if np.any(temperature < 0) or np.any(top_k < 0) or np.any((top_p <= 0) | (top_p > 1)):
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if stop_per_row is not None and len(stop_per_row) != rows:
            raise ValueError(f"stop_per_row has {len(stop_per_row)} entries for {rows} rows")
        matchers = [_StopMatcher(stop_per_row[b] if stop_per_row is not None else stop, tokenizer)
                    for b in range(rows)]
        reasons = ["length"] * rows

        # Bucketed shapes: extra rows are finished from the start; extra prompt positions are left
        # padding; extra images are zeros that no placeholder refers to.
        padded_rows, padded_len = batch_bucket(rows), prompt_bucket(length)
        ids = np.full((padded_rows, padded_len), self.config.pad_token_id, np.int32)
        ids[:rows, padded_len - length:] = input_ids
        full_mask = np.zeros((padded_rows, padded_len), np.int32)
        full_mask[:rows, padded_len - length:] = mask
        full_mask[rows:, -1] = 1  # filler rows get one real token so their attention is defined
        if pixel_values is not None:
            if pixel_values.ndim == 5 and layouts is None:  # LLaVA-1.5's (B, M, H, W, 3): one slot row per row
                pixel_values = np.concatenate(
                    [pixel_values, np.zeros((padded_rows - rows,) + pixel_values.shape[1:], np.float32)])
            else:
                pixel_values, layouts = pad_images(pixel_values, layouts)

        def pad_rows(x, fill):
            return np.concatenate([x, np.full((padded_rows - rows,), fill, x.dtype)])

        sample = bool(np.any(temperature > 0))
        ranked = filter_width(temperature, top_k, top_p, self.config.text.vocab_size) if sample else 0
        keys = jax.vmap(jax.random.key)(pad_rows(seeds, 0))
        sampling = (pad_rows(temperature, 0), pad_rows(top_k, 0), pad_rows(top_p, 1), keys)
        final_length = padded_len + _round_up(width, _NEW_TOKENS_ROUNDING)
        cache_length = min(final_length, padded_len + self.cache_growth)
        limits_padded = pad_rows(limits, 1)

        out = np.full((rows, width), pad_id, np.int32)
        generated = [[] for _ in range(rows)]
        finished = np.zeros(rows, bool)

        def record(step_tokens):
            """Append one step's tokens to unfinished rows, stream them, apply stop criteria."""
            active = ~finished
            step_tokens = np.where(active, step_tokens, pad_id).astype(np.int32)
            for b in np.flatnonzero(active):
                token = int(step_tokens[b])
                out[b, len(generated[b])] = token
                generated[b].append(token)
                if token in eos_ids:
                    finished[b], reasons[b] = True, "eos"
                elif matchers[b] and matchers[b].matches(generated[b]):
                    finished[b], reasons[b] = True, "stop"
                elif len(generated[b]) >= limits[b]:
                    finished[b] = True
            if stream_callback is not None:
                stream_callback(step_tokens, active)

        with self._mesh_context():
            first, position, cache = self._prefill(self.state, ids, full_mask, pixel_values, layouts, sampling,
                                                   cache_length=cache_length, sample=sample, width=ranked)
            record(np.asarray(first)[:rows])
            token, steps_done = first, 1
            count = jnp.ones((padded_rows,), jnp.int32)
            eos = jnp.asarray(eos_ids if eos_ids else [-1], jnp.int32)
            while not finished.all():
                # slots the next chunk may write: the prompt's, one per decode step so far, a chunk
                needed = padded_len + steps_done - 1 + self.chunk_size
                if needed > cache_length:
                    cache_length = min(final_length, max(needed, cache_length + self.cache_growth))
                    cache = self._extend_cache(cache, max_length=cache_length)
                done = pad_rows(finished, True)
                chunk, steps, token, position, cache, _, count = self._decode_chunk(
                    self.state, cache, token, position, done, count, limits_padded,
                    jnp.int32(steps_done), sampling, eos, jnp.int32(pad_id),
                    num_steps=self.chunk_size, sample=sample, width=ranked)
                chunk, steps = np.asarray(chunk), int(steps)
                if steps == 0:  # cannot happen while the jitted and Python stop rules agree
                    raise RuntimeError("decode made no progress although some rows are unfinished")
                for i in range(steps):
                    if finished.all():
                        break
                    record(chunk[:rows, i])
                steps_done += steps
        return (out, reasons) if return_finish_reasons else out


def generate(model, input_ids, pixel_values=None, attention_mask=None, *, image_sizes=None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             stop: Optional[Sequence[Union[str, Sequence[int]]]] = None, tokenizer=None,
             stream_callback: Optional[Callable] = None, mesh=None) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens per row -> int32 numpy array (batch, max_new_tokens).

    model: an `LlavaModel` (or a `Generator` already built from one).
    input_ids: int32 (B, S), rows left-padded (attention_mask zeros on the left), image placeholders
      expanded (`num_image_tokens` copies of `image_token_id` per image).
    pixel_values: float32 (N, H, W, 3), preprocessed, in placeholder order; for an AnyRes (LLaVA-1.6)
      model (N, P, H, W, 3) tiles (`anyres.preprocess_anyres`) with `image_sizes` (N, 2), each image's
      original (height, width), and `anyres.num_image_tokens(size)` placeholders per image
      (`prepare_images`).
    temperature 0 is greedy; otherwise sampling from softmax(logits / temperature) restricted to the
      top_k tokens (0 = all) and to the top_p nucleus; the PRNG key comes from `seed` (per row:
      `jax.random.key(seed)`).
    eos_token_id: int or ids that finish a row (included in the output); None = the model config's,
      [] = never. pad_token_id fills finished rows; None = the model config's.
    stop: token-id sequences and/or strings (strings need `tokenizer`): a row finishes after the
      token that completes a match (the matching tokens are included in the output).
    stream_callback(tokens, active): called once per step with the new token of every row (int32
      (B,)) and which rows were still generating (bool (B,)); finished rows hold the pad id.
    mesh: place the parameters over this mesh (`llava_jax.sharding.make_mesh`) for big models.

    Calls on the same model reuse one Generator (and so its compiled code) while the model's
    parameter arrays are the same objects; after the parameters change (training, loading) the next
    call builds a new one. The cached Generator holds its own copy of the decoder weights (see
    `Generator`) for as long as the model lives: pass a `Generator` yourself to control that memory,
    or call `clear_generator_cache()`.
    """
    generator = model if isinstance(model, Generator) else _cached_generator(model, mesh)
    return generator.generate(input_ids, pixel_values, attention_mask, image_sizes=image_sizes,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop=stop,
                              tokenizer=tokenizer, stream_callback=stream_callback)


# model -> (mesh, its parameter arrays when the Generator was built, Generator)
_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached_generator(model, mesh) -> Generator:
    leaves = jax.tree.leaves(nnx.state(model))
    hit = _GENERATORS.get(model)
    if (hit is not None and hit[0] is mesh and len(hit[1]) == len(leaves)
            and all(a is b for a, b in zip(hit[1], leaves))):
        return hit[2]
    generator = Generator(model, mesh=mesh)
    _GENERATORS[model] = (mesh, leaves, generator)
    return generator


def clear_generator_cache() -> None:
    """Forget the Generators `generate` built (and their weight copies)."""
    _GENERATORS.clear()
