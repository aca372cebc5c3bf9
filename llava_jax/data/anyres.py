"""AnyRes (LLaVA-1.6 / LLaVA-NeXT): high-resolution images as a grid of tiles plus a base image.

Geometry, as the reference and transformers' LlavaNextImageProcessor compute it:
- `select_best_resolution`: among the grid pinpoints (h, w), the one that keeps the most of the
  image's pixels when the image is scaled to fit inside it; ties go to the least wasted canvas.
- `preprocess_anyres`: resize the image into that resolution keeping its aspect ratio (PIL bicubic),
  pad it centred with black, cut it into `size` x `size` tiles (row-major), and put the whole image
  resized to `size` x `size` (no padding) in front: (1 + tiles, size, size, 3) float32, channels last,
  CLIP-normalized like `image.preprocess`.
- `feature_layout`: which tower features the model keeps for one image: the base tile's features,
  then the tiles' features reassembled into one grid with the rows (or columns) that only saw
  padding removed ("unpad"), each grid row followed by the learned `image_newline`. It fixes the
  image's placeholder count, so prompts, the model and the data pipeline agree on it.

Everything here is host-side numpy/PIL: the layouts become small int arrays the jitted model reads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.conversation import BadSample
from llava_jax.data.image import CLIP_MEAN, CLIP_STD, ImageLike, load_image, to_rgb

# llava-hf v1.6 checkpoints (and the reference's llava-v1.6 configs) use these, (height, width).
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# Larger images are refused rather than decoded and resized for minutes (PIL's bomb limit is ~89 MP).
MAX_IMAGE_PIXELS = 64 * 2**20


class UnusableImage(BadSample):
    """An image AnyRes cannot represent (too thin to keep a feature row, or absurdly large)."""
    reason = "unusable_image"


def check_grid_pinpoints(pinpoints, tile: int) -> tuple:
    """The pinpoints as a tuple of (h, w) int pairs; ValueError unless each side is a positive
    multiple of the tower's input size `tile` (otherwise the grid would not cut into whole tiles)."""
    try:
        points = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs; got {pinpoints!r}") from None
    bad = [p for p in points if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if not points or bad:
        raise ValueError(f"image_grid_pinpoints {[list(p) for p in bad] or '[]'} do not fit the vision tower: each "
                         f"[height, width] must be a positive multiple of its image_size {tile}")
    return points


def select_best_resolution(size_hw: Sequence[int], pinpoints) -> tuple:
    """(h, w) of the pinpoint that keeps most of an image of size (H, W) (transformers' rule)."""
    height, width = int(size_hw[0]), int(size_hw[1])
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    return best


def fit_size(size_hw: Sequence[int], target_hw: Sequence[int]) -> tuple:
    """(h, w) of the image scaled to fit `target_hw` with its aspect ratio (the longer fit side
    exactly, the other rounded up and capped)."""
    height, width = size_hw
    target_h, target_w = target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """Which features of an image's tiles the model keeps, in feature units (`side` per tile side).

    The tiles form a `grid_h` x `grid_w` grid of (grid_h * side) x (grid_w * side) features; rows
    [row0, row0 + rows) and columns [col0, col0 + cols) survive the unpadding."""

    side: int
    grid_h: int
    grid_w: int
    row0: int
    rows: int
    col0: int
    cols: int

    @property
    def num_tiles(self) -> int:
        """Tiles including the base image."""
        return 1 + self.grid_h * self.grid_w

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens: the base tile's features, then each kept row plus its newline."""
        return self.side * self.side + self.rows * (self.cols + 1)

    def as_row(self) -> list:
        """The int row the model reads (see llava_jax.models.llava_next.LAYOUT_FIELDS)."""
        return [self.grid_w, self.row0, self.rows, self.col0, self.cols]


def feature_layout(size_hw: Sequence[int], pinpoints, tile: int, patch: int) -> FeatureLayout:
    """The layout of an image of size (H, W) for a tower of input size `tile` and patch `patch`."""
    height, width = int(size_hw[0]), int(size_hw[1])
    if height <= 0 or width <= 0:
        raise UnusableImage(f"image size {height}x{width} is empty")
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    side = tile // patch
    grid_h, grid_w = best_h // tile, best_w // tile
    cur_h, cur_w = grid_h * side, grid_w * side
    row0, rows, col0, cols = 0, cur_h, 0, cur_w
    # transformers' unpad_image: the side the image fills is kept whole; of the other, the rows or
    # columns that only covered the centred padding are cut, the same number from each end.
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        row0 = (cur_h - new_h) // 2
        rows = cur_h - 2 * row0
    else:
        new_w = int(round(width * (cur_h / height), 7))
        col0 = (cur_w - new_w) // 2
        cols = cur_w - 2 * col0
    if rows <= 0 or cols <= 0:
        raise UnusableImage(f"image of {width}x{height} (w x h) is too thin for AnyRes: no row of features "
                            f"survives the unpadding; pad or crop it to a less extreme aspect ratio")
    return FeatureLayout(side, grid_h, grid_w, row0, rows, col0, cols)


def num_image_tokens(size_hw: Sequence[int], pinpoints, tile: int = 336, patch: int = 14) -> int:
    """Placeholder tokens of an image of size (H, W) (what the llava-hf processor repeats)."""
    return feature_layout(size_hw, pinpoints, tile, patch).num_tokens


def max_tiles(pinpoints, tile: int) -> int:
    """Tiles of the largest grid plus the base image: the static tile axis of AnyRes pixel_values."""
    return 1 + max((h // tile) * (w // tile) for h, w in pinpoints)


def _normalize(pixels: np.ndarray) -> np.ndarray:
    scaled = pixels.astype(np.float64) * (1 / 255)
    return ((scaled - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)


def preprocess_anyres(image: ImageLike, pinpoints=DEFAULT_GRID_PINPOINTS, size: int = 336,
                      num_tiles: int | None = None) -> tuple:
    """-> (pixel_values (T, size, size, 3) float32, (H, W) of the original image).

    T = 1 + the best grid's tiles, or `num_tiles` when given (zero tiles appended, the static shape
    a batch needs; fewer than the image needs raises ValueError)."""
    pinpoints = check_grid_pinpoints(pinpoints, size)
    img = to_rgb(load_image(image))
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnusableImage(f"image of {width}x{height} pixels is larger than the AnyRes limit of "
                            f"{MAX_IMAGE_PIXELS} pixels; downscale it first")
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    new_h, new_w = fit_size((height, width), (best_h, best_w))
    resized = np.asarray(img.resize((new_w, new_h), Image.BICUBIC) if (new_w, new_h) != (width, height) else img)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas = np.zeros((best_h, best_w, 3), np.uint8)
    canvas[top:top + new_h, left:left + new_w] = resized
    tiles = [canvas[i:i + size, j:j + size] for i in range(0, best_h, size) for j in range(0, best_w, size)]
    base = np.asarray(img.resize((size, size), Image.BICUBIC) if (width, height) != (size, size) else img)
    pixels = _normalize(np.stack([base] + tiles))
    if num_tiles is not None:
        if num_tiles < len(pixels):
            raise ValueError(f"num_tiles={num_tiles} is fewer than the {len(pixels)} tiles this image needs")
        # Unused tile slots are zeros, as transformers pads a batch.
        pixels = np.concatenate([pixels, np.zeros((num_tiles - len(pixels),) + pixels.shape[1:], np.float32)])
    return pixels, (height, width)
