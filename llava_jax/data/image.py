"""Image loading and CLIP preprocessing, as the reference does it (PIL, channels last).

`preprocess(image, size, aspect)` = RGB conversion, optional padding to a square on the CLIP-mean
colour ('pad', LLaVA-1.5) or nothing ('square', LLaVA-1 and stage 1), resize of the shortest edge to
`size` (PIL bicubic), centre crop to size x size, scale by 1/255 and CLIP mean/std normalization. It
equals transformers' CLIPImageProcessorPil applied to the reference's `expand2square` output.
"""
from __future__ import annotations

import io
import os
import re
from typing import Union

import numpy as np
from PIL import Image

from llava_jax.data.conversation import BadSample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as the reference computes it
ASPECTS = ("pad", "square")


class MissingImage(BadSample):
    reason = "missing_image"


class UndecodableImage(BadSample):
    reason = "undecodable_image"


ImageLike = Union[Image.Image, np.ndarray, bytes, str, os.PathLike]


def load_image(source: ImageLike) -> Image.Image:
    """A decoded PIL image from a path, encoded bytes, a uint8 array or a PIL image.

    Raises MissingImage for a path that does not exist and UndecodableImage for data PIL cannot read
    (the message names the path)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise UndecodableImage(f"image array must be uint8 (H, W) or (H, W, C), found {source.dtype} "
                                   f"{source.shape}")
        return Image.fromarray(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, stream = "<bytes>", io.BytesIO(bytes(source))
    else:
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise MissingImage(f"image file not found: {name}")
        stream = name
    try:
        image = Image.open(stream)
        image.load()  # Image.open is lazy: decode now so errors surface here, naming the file
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        # PIL names an in-memory stream by its repr (<_io.BytesIO object at 0x...>): say <bytes> instead.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", name, str(e))
        raise UndecodableImage(f"cannot decode image {name}: {type(e).__name__}: {detail}") from e
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference gets it (`Image.open(...).convert('RGB')`): grey is replicated, palettes
    expanded, alpha dropped (not composited)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, color=PAD_COLOR) -> Image.Image:
    """Centre the image on a square canvas of side max(w, h) (the reference's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(image: ImageLike, size: int = 336, aspect: str = "pad") -> np.ndarray:
    """-> float32 (size, size, 3), normalized with the CLIP mean and std."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown image aspect {aspect!r}; expected one of {ASPECTS}")
    img = to_rgb(load_image(image))
    if aspect == "pad":
        img = expand_to_square(img)
    w, h = img.size
    # Shortest edge to `size`, the longer one scaled and floored (as transformers computes it).
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    pixels = np.asarray(img)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pixels = pixels[top:top + size, left:left + size].astype(np.float64) * (1 / 255)
    return ((pixels - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)
