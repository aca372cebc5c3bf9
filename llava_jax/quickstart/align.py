"""Stage 1 of the quickstart: the projector aligned to the language model's word embeddings.

LLaVA's stage 1 trains the projector alone so that image tokens land where the frozen LLM's word
embeddings are, through the caption likelihood of the whole LLM. On two CPU cores that objective
(forward and backward through SmolLM2's 30 layers for every caption) gets nowhere within the
quickstart's budget, so this stage reaches the same place directly: the frozen vision tower's patch
features are regressed onto word embeddings, with the projector as the only trainable part.

What each image token should say comes from the scene's boxes. The 64 px image has a 4 x 4 patch
grid, so each quadrant is a 2 x 2 block of image tokens; in each block the four tokens are given four
words about the quadrant: its object's colour, its shape, and the two words of its position (an empty
quadrant says "no object" instead of colour and shape). Read in LLaVA's raster order the image then
comes to the language model as "red circle blue square top left top right green triangle no object
bottom left bottom right": text it already reads, which is what makes stage 2 short.
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


def token_targets(scenes: Sequence[S.Scene], tokenizer, embedding: np.ndarray, grid: int) -> np.ndarray:
    """(N, grid * grid, D) float32: the word embedding each image token is aligned to."""
    if grid != 4:
        raise ValueError(f"the quickstart's alignment expects a 4 x 4 patch grid (2 x 2 tokens per quadrant), got "
                         f"{grid} x {grid}")
    vocabulary = list(S.COLORS) + list(S.SHAPES) + list(EMPTY_WORDS) + sorted({w for p in S.POSITIONS for w in p.split()})
    table = word_embeddings(vocabulary, tokenizer, embedding)
    targets = np.zeros((len(scenes), grid * grid, embedding.shape[1]), np.float32)
    for n, scene in enumerate(scenes):
        words = slot_words(scene)
        for row in range(grid):
            for col in range(grid):
                quadrant = (row // 2) * 2 + col // 2
                slot = (row % 2) * 2 + col % 2
                targets[n, row * grid + col] = table[words[quadrant][slot]]
    return targets


def vision_features(model, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The frozen tower's features the projector reads (N, T, vision_feature_dim), computed once."""
    import jax
    import jax.numpy as jnp

    features = jax.jit(model.vision_features)
    return np.concatenate([np.asarray(features(jnp.asarray(pixels[i:i + batch_size])))
                           for i in range(0, len(pixels), batch_size)])


def train_projector(projector, features: np.ndarray, targets: np.ndarray, *, steps: int, lr: float,
                    batch_size: int, seed: int, progress: Optional[Callable] = None) -> list:
    """Mean squared error between projected features and targets; updates `projector` in place."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params = nnx.split(projector, nnx.Param)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2)))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean(jnp.sum((nnx.merge(graphdef, p)(x) - y) ** 2, axis=-1))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    history = []
    for i in range(steps):
        index = rng.integers(0, len(features), batch_size)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(features[index]), jnp.asarray(targets[index]))
        history.append({"step": i + 1, "loss": float(loss)})
        if progress is not None:
            progress(history[-1])
    nnx.update(projector, params)
    return history


def nearest_word_accuracy(projected: np.ndarray, scenes: Sequence[S.Scene], tokenizer, embedding: np.ndarray) -> dict:
    """How often each quadrant's colour and shape tokens are nearest to the right word's embedding."""
    colours = list(S.COLORS) + [EMPTY_WORDS[0]]
    shapes = list(S.SHAPES) + [EMPTY_WORDS[1]]
    table = word_embeddings(colours + shapes, tokenizer, embedding)
    grid = int(round(np.sqrt(projected.shape[1])))
    right = {"color": 0, "shape": 0}
    for n, scene in enumerate(scenes):
        words = slot_words(scene)
        for quadrant in range(4):
            first = (quadrant // 2) * 2 * grid + (quadrant % 2) * 2  # the block's top-left token
            for kind, options, token, truth in (("color", colours, first, words[quadrant][0]),
                                                ("shape", shapes, first + 1, words[quadrant][1])):
                vec = projected[n, token]
                right[kind] += min(options, key=lambda w: float(np.sum((vec - table[w]) ** 2))) == truth
    return {k: v / (4 * len(scenes)) for k, v in right.items()}


def align(model, tokenizer, train_pixels: np.ndarray, train_scenes, eval_pixels: np.ndarray, eval_scenes, *,
          steps: int = 400, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
          progress: Optional[Callable] = None) -> dict:
    """Train `model.projector` (in place) -> {"history", "seconds", "eval_mse", "eval_target_norm2",
    "nearest_word"} where nearest_word is the held-out per-quadrant colour/shape read-out."""
    start = time.perf_counter()
    embedding = np.asarray(model.language_model.embed_tokens.embedding[...])
    grid = model.config.vision.image_size // model.config.vision.patch_size
    history = train_projector(model.projector, vision_features(model, train_pixels),
                              token_targets(train_scenes, tokenizer, embedding, grid), steps=steps, lr=lr,
                              batch_size=batch_size, seed=seed, progress=progress)
    projected = np.asarray(model.projector(vision_features(model, eval_pixels)))
    targets = token_targets(eval_scenes, tokenizer, embedding, grid)
    return {"history": history, "seconds": time.perf_counter() - start,
            "eval_mse": float(np.mean(np.sum((projected - targets) ** 2, -1))),
            "eval_target_norm2": float(np.mean(np.sum(targets ** 2, -1))),
            "nearest_word": nearest_word_accuracy(projected, eval_scenes, tokenizer, embedding)}
