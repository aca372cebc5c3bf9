"""Image preprocessing equals transformers' CLIPImageProcessorPil after the reference's expand2square."""
from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from llava_jax.data import image as image_lib


def reference_expand2square(pil_img, background_color):
    # The reference's helper, restated.
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def _make_images():
    rgba = np.dstack([skimage.data.chelsea(), np.linspace(0, 255, 300 * 451).reshape(300, 451).astype(np.uint8)])
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "chelsea": Image.fromarray(skimage.data.chelsea()),
        "coffee": Image.fromarray(skimage.data.coffee()),
        "rocket": Image.fromarray(skimage.data.rocket()),
        "coins_grey": Image.fromarray(skimage.data.coins()),  # mode L, 303x384
        "chelsea_rgba": Image.fromarray(rgba, "RGBA"),
        "coffee_palette": Image.fromarray(skimage.data.coffee()).convert("P"),
        "tall": Image.fromarray(skimage.data.rocket()).transpose(Image.Transpose.TRANSPOSE),
    }


IMAGES = _make_images()


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_matches_clip_image_processor(aspect, size):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    mean = tuple(int(x * 255) for x in processor.image_mean)
    assert mean == image_lib.PAD_COLOR == (122, 116, 104)
    for name, img in IMAGES.items():
        ref_input = img.convert("RGB")  # the reference loads with Image.open(...).convert('RGB')
        if aspect == "pad":
            ref_input = reference_expand2square(ref_input, mean)
        expected = processor(ref_input, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = image_lib.preprocess(img, size, aspect)
        assert ours.dtype == np.float32 and ours.shape == (size, size, 3), name
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=f"{name} {aspect} {size}")


def test_pad_canvas_and_inputs():
    wide = np.zeros((10, 30, 3), np.uint8) + 255
    padded = image_lib.expand_to_square(Image.fromarray(wide))
    arr = np.asarray(padded)
    assert arr.shape == (30, 30, 3)
    assert (arr[:10] == (122, 116, 104)).all() and (arr[10:20] == 255).all() and (arr[20:] == (122, 116, 104)).all()
    # Arrays, encoded bytes and paths give the same result as the PIL image.
    img = IMAGES["chelsea"]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    expected = image_lib.preprocess(img, 28, "pad")
    np.testing.assert_array_equal(image_lib.preprocess(np.asarray(img), 28, "pad"), expected)
    np.testing.assert_array_equal(image_lib.preprocess(buf.getvalue(), 28, "pad"), expected)
    with pytest.raises(ValueError, match="unknown image aspect"):
        image_lib.preprocess(img, 28, "crop")


def test_bad_images_name_the_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(image_lib.MissingImage, match="nope.jpg"):
        image_lib.load_image(missing)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(image_lib.UndecodableImage, match="broken.jpg"):
        image_lib.load_image(broken)
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    IMAGES["chelsea"].save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:2000])
    with pytest.raises(image_lib.UndecodableImage, match="truncated.png"):
        image_lib.load_image(truncated)
    assert image_lib.MissingImage.reason == "missing_image"
    assert image_lib.UndecodableImage.reason == "undecodable_image"
