"""models/image_input.py: the decoding policy (modes, sizes, refusals) against PIL and numpy directly."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import ConfigError, InputError
from models.image_input import (
    InputContract,
    decode_base64,
    decode_base64_image,
    decode_image,
    tensor_from_json,
)
from models.preprocess import resize_and_crop

GREY = InputContract(1, 28, 28)
RGB = InputContract(3, 28, 28)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_exact_size_greyscale_png_round_trips() -> None:
    pixels = random_pixels((28, 28))
    out = decode_image(encode(Image.fromarray(pixels)), GREY)
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], pixels)


def test_rgb_is_converted_to_luma_for_one_channel_bundles() -> None:
    image = Image.fromarray(random_pixels((28, 28, 3)))
    out = decode_image(encode(image), GREY)
    np.testing.assert_array_equal(out[..., 0], np.asarray(image.convert("L")))
    out3 = decode_image(encode(image.convert("L")), RGB)  # and greyscale is replicated for RGB bundles
    assert out3.shape == (28, 28, 3)
    np.testing.assert_array_equal(out3[..., 0], out3[..., 2])


def test_alpha_is_dropped_not_composited() -> None:
    rgba = random_pixels((28, 28, 4))
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA")), RGB)
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    pixels = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 83).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(pixels)), GREY)
    np.testing.assert_array_equal(out[..., 0], (pixels >> 8).astype(np.uint8))


def test_other_sizes_are_cropped_like_training_or_refused() -> None:
    image = Image.fromarray(random_pixels((40, 56)))  # 56 wide, 40 high
    out = decode_image(encode(image), GREY)
    np.testing.assert_array_equal(out[..., 0], np.asarray(resize_and_crop(image, 28)))
    with pytest.raises(InputError, match="image is 56x40, the bundle takes 28x28"):
        decode_image(encode(image), InputContract(1, 28, 28, resize="refuse"))


def test_jpeg_is_accepted_and_decoded_like_pil() -> None:
    image = Image.fromarray(random_pixels((28, 28, 3)))
    data = encode(image, "JPEG", quality=90)
    np.testing.assert_array_equal(
        decode_image(data, RGB), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"hello, not an image", "not a PNG or JPEG"),
        (encode(Image.fromarray(random_pixels((28, 28))), "GIF"), "not a PNG or JPEG"),
        (encode(Image.fromarray(random_pixels((28, 28))))[:120], "truncated or corrupt PNG"),
        (encode(Image.fromarray(random_pixels((28, 28, 3))), "JPEG")[:300], "truncated or corrupt"),
    ],
    ids=["empty", "text", "gif", "truncated-png", "truncated-jpeg"],
)
def test_unreadable_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        decode_image(data, GREY)


def test_pixel_cap_refuses_from_the_header() -> None:
    big = encode(Image.new("L", (3000, 2000)))  # tiny file, 6 M pixels
    with pytest.raises(InputError, match="3000x2000 = 6000000 pixels, more than the limit of 1000000"):
        decode_image(big, InputContract(1, 28, 28, max_pixels=1_000_000))


def test_contract_refuses_unusable_policies() -> None:
    with pytest.raises(ConfigError, match="square"):
        InputContract(1, 28, 32, resize="crop")
    with pytest.raises(ConfigError, match="resize policy"):
        InputContract(1, 28, 28, resize="stretch")
    assert InputContract.from_shape((3, 32, 32)).shape == (3, 32, 32)


def test_base64_strict_with_data_url() -> None:
    data = encode(Image.fromarray(random_pixels((28, 28))))
    text = base64.b64encode(data).decode()
    assert decode_base64(text) == data
    assert decode_base64("data:image/png;base64," + text[:20] + "\n" + text[20:]) == data
    np.testing.assert_array_equal(decode_base64_image(text, GREY), decode_image(data, GREY))
    for bad, message in (("@@@@", "not valid base64"), ("abc", "not valid base64"), ("  ", "empty")):
        with pytest.raises(InputError, match=message):
            decode_base64(bad)
    with pytest.raises(InputError, match="data URL"):
        decode_base64("data:image/png," + text)


def test_tensor_from_json_accepts_both_shapes() -> None:
    values = np.random.default_rng(1).normal(size=(1, 28, 28))
    out = tensor_from_json(values.tolist(), (1, 28, 28))
    assert out.shape == (1, 1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.from_numpy(values).float())
    torch.testing.assert_close(tensor_from_json([values.tolist()], (1, 28, 28)), out)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "nested list"),
        ([[[0.0] * 28] * 27], r"shape \[1, 27, 28\]"),
        ([[[0.0] * 28] * 27 + [[0.0] * 5]], "ragged or non-numeric"),
        ([[["x"] * 28] * 28], "ragged or non-numeric"),
        ([[[float("nan")] + [0.0] * 27] * 28], r"28 NaN value\(s\), the first at index \[0, 0, 0\]"),
        ([[[0.0] * 27 + [float("inf")]] * 28], r"28 infinite value\(s\), the first at index \[0, 0, 27\]"),
        ([[[1e39] + [0.0] * 27] * 28], "infinite"),  # finite in float64, not in float32
    ],
    ids=["not-list", "wrong-shape", "ragged", "strings", "nan", "inf", "float32-overflow"],
)
def test_tensor_from_json_refusals(value: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        tensor_from_json(value, (1, 28, 28))
