"""AnyRes feature packing (LLaVA-1.6 / LLaVA-NeXT), as a gather with static shapes.

Inputs (see docs/internals.md, "AnyRes"):
- `pixel_values` (N, P, H, W, 3): per image its base tile then its grid tiles (row-major), zero tiles
  after them; P is static (`llava_jax.data.anyres.max_tiles`, 5 for the v1.6 grids).
- a layout per image, an int32 row `LAYOUT_FIELDS` (`anyres.FeatureLayout.as_row`), computed on the
  host from the image size (`layouts_from_sizes`): the layout decides which features survive the
  unpadding, and doing it in numpy keeps transformers' float rounding exactly.

transformers builds each image's feature run by reshaping and slicing (a different shape per image).
Here every placeholder instead computes where its feature comes from: the k-th placeholder of image
i reads the base tile's feature k for k < side^2; after that the kept grid is read row by row, each
row `cols` features then the learned `image_newline`. All shapes depend only on (B, S), N and P, so
one compiled program serves every mix of image sizes; how many placeholders an image has is the
prompt's business (`anyres.num_image_tokens`), and the sequence length is bucketed as for LLaVA-1.5.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.data import anyres

LAYOUT_FIELDS = ("grid_w", "row0", "rows", "col0", "cols")


def layouts_from_sizes(image_sizes, config) -> np.ndarray:
    """(..., 2) original (height, width) per image -> (..., 5) int32 layouts for `config`.

    A (0, 0) size marks an empty image slot (training rows with fewer images than slots): its
    layout is all zeros, a run of side^2 tokens that no placeholder refers to."""
    sizes = np.asarray(image_sizes)
    if sizes.shape[-1:] != (2,):
        raise ValueError(f"image_sizes must be (..., 2) (height, width) pairs; got shape {sizes.shape}")
    v = config.vision
    rows = [[0] * len(LAYOUT_FIELDS) if not s.any() else
            anyres.feature_layout(s, config.image_grid_pinpoints, v.image_size, v.patch_size).as_row()
            for s in sizes.reshape(-1, 2)]
    return np.asarray(rows, np.int32).reshape(*sizes.shape[:-1], len(LAYOUT_FIELDS))


def tokens_per_image(layouts, side: int):
    """Placeholder count of each image from its layout row (numpy or jax)."""
    return side * side + layouts[..., 2] * (layouts[..., 4] + 1)


def check_layouts(layouts: np.ndarray, num_tiles: int, side: int, placeholders: int, where: str = ""):
    """Concrete checks before anything runs: every image's tiles fit the P slots, and the placeholders
    are exactly the token runs of the first k images (trailing unused images are allowed)."""
    grid_h = (2 * layouts[:, 1] + layouts[:, 2]) // side  # the unpadding cuts as much from each end
    need = 1 + grid_h * layouts[:, 0]
    if (need > num_tiles).any():
        i = int(np.argmax(need > num_tiles))
        raise ValueError(f"image {i}{where} needs {int(need[i])} tiles (base + grid) but pixel_values has {num_tiles} "
                         f"tile slots; preprocess with llava_jax.data.anyres.preprocess_anyres(num_tiles=...)")
    runs = np.concatenate([[0], np.cumsum(tokens_per_image(layouts, side))])
    if placeholders not in runs:
        raise ValueError(
            f"image placeholder count mismatch{where}: input_ids hold {placeholders} placeholder tokens but the "
            f"images' AnyRes token runs add up to {runs[1:].tolist()} (first 1, 2, ... images); give each image "
            f"llava_jax.data.anyres.num_image_tokens(size) placeholders")


def gather_features(tile_features, newline, layouts, is_image, side: int):
    """Each placeholder's feature.

    tile_features (N, P, side*side, D): projected features of every tile slot; newline (D,);
    layouts (N, 5) int32; is_image (B, S) bool -> (B, S, D). Placeholders are consumed row-major over
    the batch, image after image; non-placeholders get an arbitrary feature (the caller masks them)."""
    n, p, t, d = tile_features.shape
    layouts = jnp.asarray(layouts, jnp.int32)
    grid_w, row0, rows, col0, cols = (layouts[:, k] for k in range(len(LAYOUT_FIELDS)))
    ends = jnp.cumsum(tokens_per_image(layouts, side))  # (N,) end of each image's run
    order = jnp.cumsum(is_image.reshape(-1)) - 1  # global placeholder ordinal, (B*S,)
    image = jnp.clip(jnp.sum(order[:, None] >= ends[None, :], axis=1), 0, n - 1)
    k = order - (ends[image] - tokens_per_image(layouts[image], side))  # ordinal within the image
    j = jnp.maximum(k - t, 0)  # ordinal within the kept grid (rows of cols features + newline)
    width = cols[image] + 1
    row, col = j // width, j % width
    grid_row, grid_col = row0[image] + row, col0[image] + jnp.minimum(col, cols[image] - 1)
    tile = 1 + (grid_row // side) * grid_w[image] + grid_col // side
    feature = (grid_row % side) * side + grid_col % side
    in_base = k < t
    tile = jnp.where(in_base, 0, jnp.clip(tile, 0, p - 1))
    feature = jnp.where(in_base, jnp.clip(k, 0, t - 1), feature)
    flat = tile_features.reshape(n * p * t, d)
    picked = jnp.take(flat, (image * p + tile) * t + feature, axis=0)
    is_newline = ~in_base & (col == cols[image])
    out = jnp.where(is_newline[:, None], newline[None].astype(picked.dtype), picked)
    return out.reshape(*is_image.shape, d)


def gather_features_per_row(tile_features, newline, layouts, is_image, side: int):
    """The training layout: tile_features (B, M, P, side*side, D), layouts (B, M, 5), is_image (B, S):
    row b's placeholders take row b's images in slot order (packed rows: sample after sample)."""
    one_row = lambda f, lay, m: gather_features(f, newline, lay, m[None], side)[0]
    return jax.vmap(one_row)(tile_features, jnp.asarray(layouts, jnp.int32), is_image)
