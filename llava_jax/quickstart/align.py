"""Stage 1 of the quickstart: image tokens aligned to the language model's word embeddings.

LLaVA's stage 1 trains the projector alone so that image tokens land where the frozen LLM's word
embeddings are, through the caption likelihood of the whole LLM. On two CPU cores that objective
(forward and backward through SmolLM2's 30 layers for every caption) gets nowhere within the
quickstart's budget, so this stage reaches the same place directly: every image token is regressed
onto a word embedding, and the LLM is not run at all.

What each image token should say comes from the scene's boxes. The 64 px image has a 4 x 4 patch
grid, so each quadrant is a 2 x 2 block of image tokens; in each block the four tokens are given four
words about the quadrant: its object's colour, its shape, and the two words of its position (an empty
quadrant says "no object" instead of colour and shape). Read in LLaVA's raster order the image then
comes to the language model as "red circle blue square top left top right green triangle no object
bottom left bottom right": text it already reads, which is what makes stage 2 short (with these exact
word embeddings in place of the image, SmolLM2 fully fine-tuned for 48 steps answers 0.89 of
the held-out questions).

Unlike LLaVA, this stage also trains the vision tower (CLIP-pretrained for only ~100 steps). An
object sits on the corner where its quadrant's four patches meet, so each patch sees a quarter of it,
and the token that must say the shape has to gather it from its neighbours: with the tower frozen the
projector reads the right shape for ~0.6 of held-out objects, with the tower trained ~0.95. Besides
the squared distance, each token is scored as a classification among the words of the world
(logits: minus its squared distance to each word's embedding): neighbouring shape words have close
embeddings, and the squared error alone barely separates them.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np

from llava_jax.data import synthetic as S

EMPTY_WORDS = ("no", "object")
SLOTS = 4  # tokens per quadrant (a 2 x 2 block of the 4 x 4 patch grid)


def slot_words(scene: S.Scene) -> list:
    """Four words per quadrant, in POSITIONS order: colour, shape, position word 1, position word 2."""
    out = []
    for position in S.POSITIONS:
        obj = next((o for o in scene.objects if o.position == position), None)
        out.append(([obj.color, obj.shape] if obj else list(EMPTY_WORDS)) + position.split())
    return out


def word_embeddings(words: Sequence[str], tokenizer, embedding: np.ndarray) -> dict:
    """word -> the embedding of " word" (the mean of its pieces if the tokenizer splits it)."""
    out = {}
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the tokenizer gives no token for {word!r}")
        out[word] = np.asarray(embedding[ids], np.float32).mean(axis=0)
    return out


def vocabulary() -> list:
    """Every word an image token is aligned to."""
    return (list(S.COLORS) + list(S.SHAPES) + list(EMPTY_WORDS)
            + sorted({w for p in S.POSITIONS for w in p.split()}))


def token_words(scenes: Sequence[S.Scene], grid: int) -> np.ndarray:
    """(N, grid * grid) int32: index into vocabulary() of the word each image token is aligned to."""
    if grid != 4:
        raise ValueError(f"the quickstart's alignment expects a 4 x 4 patch grid (2 x 2 tokens per quadrant), got "
                         f"{grid} x {grid}")
    index = {w: i for i, w in enumerate(vocabulary())}
    out = np.zeros((len(scenes), grid * grid), np.int32)
    for n, scene in enumerate(scenes):
        words = slot_words(scene)
        for row in range(grid):
            for col in range(grid):
                quadrant = (row // 2) * 2 + col // 2
                slot = (row % 2) * 2 + col % 2
                out[n, row * grid + col] = index[words[quadrant][slot]]
    return out


def image_tokens(model, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The projected image tokens (N, T, D_text) of `pixels`, in batches."""
    import jax
    import jax.numpy as jnp

    tokens = jax.jit(model.image_features)
    return np.concatenate([np.asarray(tokens(jnp.asarray(pixels[i:i + batch_size])))
                           for i in range(0, len(pixels), batch_size)])


def train_tokens(model, pixels: np.ndarray, words: np.ndarray, table: np.ndarray, *, steps: int, lr: float,
                 tower_lr: float, batch_size: int, classify_weight: float, seed: int,
                 progress: Optional[Callable] = None) -> list:
    """Train model's vision tower and projector (in place) so that the image tokens of pixels[i] are
    the embeddings table[words[i]]: squared distance + classify_weight * cross-entropy over the table
    (logits = -squared distance). The language model is untouched."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("vision_tower"), nnx.PathContains("projector")))
    graphdef, params, rest = nnx.split(model, trainable, ...)
    parts = {"vision_tower": tower_lr, "projector": lr}

    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 20), max(steps, 2))

    # Plain nested dicts for optax (per-part learning rates by top-level name); State only to merge.
    def as_state(pure):
        state = nnx.State(params)
        nnx.replace_by_pure_dict(state, pure)
        return state

    pure = nnx.to_pure_dict(params)
    tx = optax.multi_transform({k: optax.adam(schedule(v)) for k, v in parts.items()},
                               {k: jax.tree.map(lambda _, k=k: k, pure[k]) for k in parts})
    opt_state = tx.init(pure)
    table = jnp.asarray(table)

    @jax.jit
    def step(params, opt_state, x, target):
        def loss_fn(p):
            out = nnx.merge(graphdef, as_state(p), rest).image_features(x, frozen=False)
            distance = jnp.sum((out[:, :, None, :] - table) ** 2, axis=-1)          # (B, T, V)
            mse = jnp.mean(jnp.take_along_axis(distance, target[..., None], axis=-1))
            ce = optax.softmax_cross_entropy_with_integer_labels(-distance, target).mean()
            return mse + classify_weight * ce

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    history = []
    for i in range(steps):
        index = rng.integers(0, len(pixels), batch_size)
        pure, opt_state, loss = step(pure, opt_state, jnp.asarray(pixels[index]), jnp.asarray(words[index]))
        history.append({"step": i + 1, "loss": float(loss)})
        if progress is not None:
            progress(history[-1])
    nnx.update(model, as_state(pure))
    return history


def nearest_word_accuracy(tokens: np.ndarray, words: np.ndarray, table: np.ndarray) -> dict:
    """How often a token aligned to a colour (shape) word is nearest to that word's embedding (among
    all of vocabulary()): the colour and shape read-out of the quadrants that hold an object."""
    nearest = np.argmin(((tokens[..., None, :] - table) ** 2).sum(-1), axis=-1)
    vocab = vocabulary()
    out = {}
    for kind, names in (("color", S.COLORS), ("shape", S.SHAPES)):
        aligned_to_kind = np.isin(words, [vocab.index(w) for w in names])
        out[kind] = float((nearest == words)[aligned_to_kind].mean())
    return out


def align(model, tokenizer, train_pixels: np.ndarray, train_scenes, eval_pixels: np.ndarray, eval_scenes, *,
          steps: int = 1000, lr: float = 1e-3, tower_lr: float = 2e-3, batch_size: int = 64,
          classify_weight: float = 1.0, seed: int = 0, progress: Optional[Callable] = None) -> dict:
    """Train `model`'s vision tower and projector (in place) -> {"history", "seconds", "eval_mse",
    "eval_target_norm2", "nearest_word"} where nearest_word is the held-out colour/shape read-out of
    the quadrants that hold an object."""
    start = time.perf_counter()
    embedding = np.asarray(model.language_model.embed_tokens.embedding[...])
    word_vectors = word_embeddings(vocabulary(), tokenizer, embedding)
    table = np.stack([word_vectors[w] for w in vocabulary()])
    grid = model.config.vision.image_size // model.config.vision.patch_size
    history = train_tokens(model, train_pixels, token_words(train_scenes, grid), table, steps=steps, lr=lr,
                           tower_lr=tower_lr, batch_size=batch_size, classify_weight=classify_weight, seed=seed,
                           progress=progress)
    tokens = image_tokens(model, eval_pixels)
    eval_words = token_words(eval_scenes, grid)
    targets = table[eval_words]
    return {"history": history, "seconds": time.perf_counter() - start,
            "eval_mse": float(np.mean(np.sum((tokens - targets) ** 2, -1))),
            "eval_target_norm2": float(np.mean(np.sum(targets ** 2, -1))),
            "nearest_word": nearest_word_accuracy(tokens, eval_words, table)}
