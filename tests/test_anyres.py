"""AnyRes preprocessing and feature layouts equal transformers' LlavaNext image processor and unpadding."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image
from transformers.models.llava_next import modeling_llava_next as hf_next

from llava_jax.data import anyres

PINPOINTS = [list(p) for p in anyres.DEFAULT_GRID_PINPOINTS]


def _photos():
    coffee = skimage.data.coffee()
    rocket = skimage.data.rocket()
    return {
        "astronaut": skimage.data.astronaut(),             # 512 x 512 -> 672 x 672 grid
        "chelsea": skimage.data.chelsea(),                  # 300 x 451
        "coffee": coffee,                                   # 400 x 600
        "rocket": rocket,                                   # 427 x 640
        "very_wide": np.concatenate([coffee] * 3, axis=1)[100:300],  # 200 x 1800 -> 336 x 1008
        "very_tall": np.concatenate([rocket.transpose(1, 0, 2)] * 2, axis=0)[:, 150:300],  # 1280 x 150
        "wide_strip": skimage.data.astronaut()[:60],        # 60 x 512
        "small": skimage.data.chelsea()[:100, :90],         # smaller than one tile: upscaled
        "grey": skimage.data.camera()[::3, ::2],            # mode L, 171 x 256
    }


@pytest.fixture(scope="module")
def processor():
    return transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                   crop_size={"height": 336, "width": 336},
                                                   image_grid_pinpoints=PINPOINTS)


@pytest.mark.parametrize("name", list(_photos()))
def test_preprocess_equals_transformers(processor, name):
    photo = _photos()[name]
    ours, size = anyres.preprocess_anyres(Image.fromarray(photo))
    ref = processor(Image.fromarray(photo), return_tensors="np")
    expected = ref["pixel_values"][0].transpose(0, 2, 3, 1)  # channels first -> our channels last
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    assert tuple(size) == tuple(ref["image_sizes"][0])
    assert len(ours) == hf_next.image_size_to_num_patches(list(size), PINPOINTS, 336)


def test_grids_cover_every_pinpoint():
    chosen = {anyres.select_best_resolution(p.shape[:2], anyres.DEFAULT_GRID_PINPOINTS) for p in _photos().values()}
    assert {(336, 1008), (1008, 336), (672, 672), (336, 672)} <= chosen


def test_padded_tile_slots_are_zero():
    pixels, _ = anyres.preprocess_anyres(skimage.data.chelsea(), num_tiles=5)
    assert pixels.shape == (5, 336, 336, 3)
    assert not pixels[3:].any() and pixels[2].any()
    with pytest.raises(ValueError, match="num_tiles=2 is fewer than the 3 tiles"):
        anyres.preprocess_anyres(skimage.data.chelsea(), num_tiles=2)


@pytest.mark.parametrize("size", [(512, 512), (300, 451), (200, 1800), (1280, 150), (60, 512), (100, 90),
                                  (17, 1000), (1000, 17), (336, 672), (337, 672), (999, 1001)])
@pytest.mark.parametrize("tile,patch", [(336, 14), (28, 14)])
def test_feature_layout_equals_transformers_unpad(size, tile, patch):
    pinpoints = [[h * tile // 336, w * tile // 336] for h, w in PINPOINTS]
    grid_h, grid_w = hf_next.get_anyres_image_grid_shape(list(size), pinpoints, tile)
    side = tile // patch
    # Number every feature of the tile grid, unpad with transformers, compare the surviving numbers.
    grid = torch.arange(grid_h * side * grid_w * side).reshape(1, grid_h * side, grid_w * side)
    kept = hf_next.unpad_image(grid, list(size))[0].numpy()
    if kept.size == 0:  # transformers would silently keep only the base image: we refuse the image
        with pytest.raises(anyres.UnusableImage, match="too thin"):
            anyres.feature_layout(size, pinpoints, tile, patch)
        return
    layout = anyres.feature_layout(size, pinpoints, tile, patch)
    assert (layout.grid_h, layout.grid_w) == (grid_h, grid_w)
    ours = grid[0].numpy()[layout.row0:layout.row0 + layout.rows, layout.col0:layout.col0 + layout.cols]
    np.testing.assert_array_equal(ours, kept)
    assert layout.num_tokens == side * side + kept.shape[0] * (kept.shape[1] + 1)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\[300, 672\].*multiple of its image_size 336"):
        anyres.check_grid_pinpoints([[336, 672], [300, 672]], 336)
    with pytest.raises(anyres.UnusableImage, match="too thin"):
        anyres.feature_layout((1, 5000), PINPOINTS, 336, 14)
    with pytest.raises(anyres.UnusableImage, match="larger than the AnyRes limit"):
        anyres.preprocess_anyres(Image.new("RGB", (20000, 4000)))


def test_encode_expands_each_image_to_its_own_count():
    from llava_jax.data import conversation as conv
    from llava_jax.testing.tokenizer import llama_tokenizer

    tok = llama_tokenizer()
    source = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
              {"from": "human", "value": "And this? <image>"}, {"from": "gpt", "value": "A dog."}]
    counts = [anyres.num_image_tokens(s, PINPOINTS) for s in [(512, 512), (200, 1800)]]
    out = conv.encode(source, tok, "mistral_instruct", image_token_id=99, num_image_tokens=counts)
    ids = out["input_ids"].tolist()
    first = ids.index(99)
    assert ids[first:first + counts[0]] == [99] * counts[0] and ids[first + counts[0]] != 99
    assert ids.count(99) == sum(counts) and counts == [2928, 576 + 8 * 73]  # 24 x 72 grid, 8 rows kept
    single = conv.encode(source, tok, "mistral_instruct", image_token_id=99, num_image_tokens=1)
    np.testing.assert_array_equal(out["labels"][out["labels"] != -100], single["labels"][single["labels"] != -100])
    with pytest.raises(conv.MalformedConversation, match="2 <image> marker.*1 per-image token counts"):
        conv.encode(source, tok, "mistral_instruct", image_token_id=99, num_image_tokens=counts[:1])
    with pytest.raises(conv.TooLong, match=r"cut through the image tokens at"):
        conv.encode(source, tok, "mistral_instruct", image_token_id=99, num_image_tokens=counts, max_length=3000)
