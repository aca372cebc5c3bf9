"""CLIP-style pretraining of the vision tower: images against their captions, symmetric InfoNCE.

The image side is the project's CLIP vision tower (the module LLaVA later freezes) and a visual
projection of the mean patch token at the layer LLaVA reads (by default; CLIP's pooled CLS token is
the other option: with it, a linear probe of the patch tokens read shapes at ~0.5 and an MLP probe at
~0.64 on held-out scenes, against ~0.58 and ~0.9 with the patch mean). The text side is a tiny causal transformer built from
the project's LLaMA decoder, pooled at each caption's last token as CLIP's text tower pools at EOT.
Only the vision tower is kept afterwards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llava_jax.models import layers as L
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import TextConfig, VisionConfig
from llava_jax.models.llama import LlamaModel, default_positions


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    embed_dim: int = 64
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    batch_size: int = 128
    steps: int = 200
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    # "patch_mean": the image embedding is the mean of the patch tokens at `feature_layer`, the very
    # features LLaVA's projector reads, so the contrastive loss shapes each patch token directly.
    # "cls": CLIP's own pooling (post-layernormed CLS token of the last layer).
    pool: str = "patch_mean"
    feature_layer: int = -2
    # Region term (weight 0 = off): the patch grid is cut into region_grid x region_grid blocks
    # (the world's quadrants) and every patch token is contrasted against the texts of every
    # possible region content ("red circle", ..., "nothing"), its own block's being the match.
    # Whole-image captions name up to four objects at once, so they teach colours quickly but
    # shapes slowly; a region text names one object, and asking it of each patch token (not of a
    # pooled block) makes every token say what its quadrant holds: each image token LLaVA's
    # projector reads then carries its object, not a corner of it (RegionCLIP-style).
    region_weight: float = 0.0
    region_grid: int = 2


class TextEncoder(nnx.Module):
    """Causal LLaMA-style transformer; the caption embedding is the hidden state of its last token."""

    def __init__(self, vocab_size: int, cfg: ContrastiveConfig, max_length: int, *, rngs: nnx.Rngs):
        text = TextConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                          num_layers=cfg.text_layers, num_heads=cfg.text_heads, num_kv_heads=cfg.text_heads,
                          max_position_embeddings=max_length, tie_word_embeddings=True)
        self.transformer = LlamaModel(text, rngs=rngs)
        self.projection = L.Dense(cfg.text_hidden, cfg.embed_dim, axes=("embed", None), rngs=rngs)

    def __call__(self, token_ids, lengths):
        segment_ids = (jnp.arange(token_ids.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
        hidden, _ = self.transformer.decode(self.transformer.embed(token_ids), segment_ids,
                                            default_positions(segment_ids))
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.projection(last)


class ContrastiveModel(nnx.Module):
    def __init__(self, vision: VisionConfig, vocab_size: int, cfg: ContrastiveConfig, max_length: int, *,
                 rngs: nnx.Rngs):
        self.vision_tower = CLIPVisionTower(vision, rngs=rngs)
        self.visual_projection = L.Dense(vision.hidden_size, cfg.embed_dim, axes=("embed", None), rngs=rngs)
        self.text_encoder = TextEncoder(vocab_size, cfg, max_length, rngs=rngs)
        # CLIP's learnable temperature, initialised to 1/0.07 and capped at 100.
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))
        if cfg.pool not in ("patch_mean", "cls"):
            raise ValueError(f"unknown contrastive pooling {cfg.pool!r}; expected 'patch_mean' or 'cls'")
        self.pool, self.feature_layer = cfg.pool, cfg.feature_layer

    def embed_images(self, pixels):
        if self.pool == "cls":
            pooled = self.vision_tower(pixels).pooler_output
        else:
            (hidden,) = self.vision_tower.select_hidden_states(pixels, (self.feature_layer,))
            pooled = hidden[:, 1:].mean(axis=1)
        return _unit(self.visual_projection(pooled))

    def embed_texts(self, token_ids, lengths):
        return _unit(self.text_encoder(token_ids, lengths))

    def embed_patches(self, pixels):
        """(N, T, embed_dim): every patch token at the feature layer, projected and normalised."""
        (hidden,) = self.vision_tower.select_hidden_states(pixels, (self.feature_layer,))
        return _unit(self.visual_projection(hidden[:, 1:]))

    def region_loss(self, pixels, region_labels, phrase_ids, phrase_lengths, grid: int):
        """Cross-entropy of every patch token against all region texts (phrase_ids: every possible
        content); a patch's label is its region's (region_labels (N, grid*grid), row-major blocks)."""
        patches = self.embed_patches(pixels)
        side = int(round(math.sqrt(patches.shape[1])))
        block = (np.arange(side)[:, None] * grid // side) * grid + np.arange(side)[None, :] * grid // side
        labels = region_labels[:, block.reshape(-1)]
        phrases = self.embed_texts(phrase_ids, phrase_lengths)
        scale = jnp.exp(jnp.minimum(self.logit_scale[...], math.log(100.0)))
        logits = scale * patches @ phrases.T
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def loss(self, pixels, token_ids, lengths, negative_ids, negative_lengths):
        """Symmetric cross-entropy over the batch's image-caption similarity matrix, and accuracy.

        Each image also competes against a hard negative caption: the same scene with other shapes.
        In random batches colours and positions alone tell scenes apart, so without these negatives
        the tower never has to see shape (NegCLIP's remedy for bag-of-words behaviour).
        """
        image, text = self.embed_images(pixels), self.embed_texts(token_ids, lengths)
        negatives = self.embed_texts(negative_ids, negative_lengths)
        scale = jnp.exp(jnp.minimum(self.logit_scale[...], math.log(100.0)))
        logits = scale * image @ text.T
        image_to_text = jnp.concatenate([logits, scale * image @ negatives.T], axis=1)
        labels = jnp.arange(logits.shape[0])
        loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(image_to_text, labels).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
        accuracy = (jnp.argmax(logits, axis=1) == labels).mean()
        return loss, accuracy


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def tokenize_captions(captions: list, tokenize: Callable, max_length: int) -> tuple:
    """N lists of K captions -> token ids (N, K, max_length) int32 (zero padded) and lengths (N, K)."""
    n, k = len(captions), len(captions[0])
    ids = np.zeros((n, k, max_length), np.int32)
    lengths = np.zeros((n, k), np.int32)
    for i, options in enumerate(captions):
        if len(options) != k:
            raise ValueError(f"image {i} has {len(options)} captions; every image needs {k}")
        for j, caption in enumerate(options):
            row = tokenize(caption)[:max_length]
            ids[i, j, :len(row)] = row
            lengths[i, j] = len(row)
    return ids, lengths


def pair_batches(images: np.ndarray, caption_ids: np.ndarray, caption_lengths: np.ndarray,
                 negative_ids: np.ndarray, negative_lengths: np.ndarray, batch_size: int, seed: int,
                 region_labels: Optional[np.ndarray] = None):
    """Grain pipeline of shuffled (image, one of its captions) batches, repeating forever.

    Each epoch is a new shuffle and takes the next caption of every image. Arrays are gathered in
    one numpy indexing per batch: per-item Python work would cost more than the step itself.
    """
    n, k = caption_lengths.shape
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    ds = ds.map_with_index(lambda pos, index: (index, (pos // n + index) % k)).batch(batch_size, drop_remainder=True)

    def gather(pairs):
        index, which = pairs
        batch = {"pixels": images[index], "token_ids": caption_ids[index, which],
                 "lengths": caption_lengths[index, which], "negative_ids": negative_ids[index, which],
                 "negative_lengths": negative_lengths[index, which]}
        if region_labels is not None:
            batch["regions"] = region_labels[index]
        return batch

    return ds.map(gather)


def train(vision: VisionConfig, images: np.ndarray, captions: list, negatives: list, tokenize: Callable,
          vocab_size: int, cfg: ContrastiveConfig, max_length: int = 48, progress: Optional[Callable] = None,
          region_labels: Optional[np.ndarray] = None, region_texts: Sequence[str] = ()):
    """Train image and text towers contrastively; returns (vision tower module, per-step metrics).

    captions[i]: the captions of image i; negatives[i][k]: a caption that differs from captions[i][k]
    in what the tower must learn to see (here: the shapes). With cfg.region_weight > 0,
    region_labels[i, r] is the index into region_texts of what region r of image i holds."""
    use_regions = cfg.region_weight > 0
    if use_regions and (region_labels is None or not len(region_texts)):
        raise ValueError("region_weight > 0 needs region_labels and region_texts")
    model = ContrastiveModel(vision, vocab_size, cfg, max_length, rngs=nnx.Rngs(cfg.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            loss, accuracy = m.loss(batch["pixels"], batch["token_ids"], batch["lengths"], batch["negative_ids"],
                                    batch["negative_lengths"])
            if use_regions:
                loss = loss + cfg.region_weight * m.region_loss(batch["pixels"], batch["regions"], phrase_ids,
                                                                phrase_lengths, cfg.region_grid)
            return loss, accuracy

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    caption_ids, caption_lengths = tokenize_captions(captions, tokenize, max_length)
    negative_ids, negative_lengths = tokenize_captions(negatives, tokenize, max_length)
    if use_regions:
        ids, lens = tokenize_captions([[t] for t in region_texts], tokenize, max_length)
        phrase_ids, phrase_lengths = jnp.asarray(ids[:, 0]), jnp.asarray(lens[:, 0])
    data = pair_batches(images, caption_ids, caption_lengths, negative_ids, negative_lengths, cfg.batch_size,
                        cfg.seed, region_labels if use_regions else None)
    history = []
    for i in range(cfg.steps):
        params, opt_state, loss, accuracy = step(params, opt_state, data[i])
        history.append({"step": i + 1, "loss": float(loss), "accuracy": float(accuracy)})
        if progress is not None:
            progress(history[-1])
    model = nnx.merge(graphdef, params)
    return model.vision_tower, history
