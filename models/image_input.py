"""Turn what a caller sends (PNG/JPEG bytes, base64 text, a JSON tensor) into the bundle's input contract.

Shared by the online service and any offline code that scores files, so a picture is read the same
way wherever it enters. Every refusal is an :class:`~models.errors.InputError` whose message says
what is wrong, never a silent misread.

Conversion policy (documented for callers):

- Formats: PNG and JPEG only; anything else is "not a PNG or JPEG image".
- Mode: any mode becomes ``L`` for a 1-channel bundle and ``RGB`` for a 3-channel one with PIL's
  ``convert`` (ITU-R 601-2 luma for greyscale; palettes expanded; **alpha dropped**, not composited),
  exactly as the offline image-folder loader does. 16-bit greyscale is scaled to 8 bits (PIL's own
  conversion would clip it); 32-bit integer and float images are refused.
- Size: ``crop`` scales the shorter side to the input size and cuts the centre square
  (:func:`models.preprocess.resize_and_crop`, the training policy); ``refuse`` rejects any image whose
  size differs from the bundle's.
- Decompression bombs: images with more than ``max_pixels`` pixels are refused from their header,
  before any pixel is decoded; so are images whose shorter side, scaled to the input size, would
  stretch the long side past that cap (a 1 x 10^6 strip), since scaling comes before the crop.
- JSON tensors: only JSON numbers (no strings, booleans or nulls, which numpy would coerce).

PIL is imported inside the functions, as in :mod:`models.preprocess`, so ``models`` imports without it.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.errors import ConfigError, InputError
from models.preprocess import resize_and_crop

RESIZE_POLICIES = ("crop", "refuse")
DEFAULT_MAX_PIXELS = 4096 * 4096
_FORMATS = ("PNG", "JPEG")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class InputContract:
    """What the bundle's CNN takes: ``channels x height x width`` and how other sizes are handled.

    Parameters
    ----------
    channels : 1 (greyscale) or 3 (RGB).
    height, width : input size in pixels.
    resize : ``crop`` or ``refuse`` (see the module docstring).
    max_pixels : largest ``width * height`` accepted from an image header.
    """

    channels: int
    height: int
    width: int
    resize: str = "crop"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"input contract: {self.channels} channels; images can fill 1 or 3")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"unknown resize policy {self.resize!r}; valid: {list(RESIZE_POLICIES)}")
        if self.resize == "crop" and self.height != self.width:
            raise ConfigError(
                f"resize policy 'crop' needs a square input, the bundle takes {self.width}x{self.height}"
            )
        if self.max_pixels < self.height * self.width:
            raise ConfigError(f"max_pixels {self.max_pixels} is below the input size itself")

    @classmethod
    def from_shape(
        cls, input_shape: tuple[int, int, int], resize: str = "crop", max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> InputContract:
        """From a bundle's ``input_shape`` (``C, H, W``)."""
        c, h, w = (int(v) for v in input_shape)
        return cls(c, h, w, resize, max_pixels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


def _to_mode(image: Any, mode: str) -> Any:
    """Convert to ``L``/``RGB``; 16-bit greyscale is scaled (not clipped) to 8 bits first."""
    from PIL import Image

    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L")
    elif image.mode in ("I", "F"):
        raise InputError(
            f"image mode {image.mode!r} (32-bit integer or float pixels) is not supported; "
            "send 8- or 16-bit PNG or JPEG"
        )
    return image if image.mode == mode else image.convert(mode)


def decode_image(data: bytes, contract: InputContract) -> np.ndarray:
    """Decode one PNG or JPEG into the contract: ``H x W x C`` uint8.

    Raises
    ------
    InputError
        Empty data, not a PNG/JPEG, truncated or corrupt, too many pixels, unsupported mode, or (with
        ``resize="refuse"``) the wrong size.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    if not data:
        raise InputError("empty image: no bytes received")
    # Truncated files must fail, not decode as grey padding.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except UnidentifiedImageError:
        raise InputError(f"not a PNG or JPEG image ({len(data)} bytes that no decoder recognises)") from None
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"image refused before decoding, over the pixel limit of {contract.max_pixels}: {exc}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header cut short
        raise InputError(f"truncated or corrupt image: {exc}") from None
    width, height = image.size
    if width * height > contract.max_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {contract.max_pixels}"
        )
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    if contract.resize == "crop" and (width, height) != (contract.width, contract.height):
        # Scaling the shorter side to the input size multiplies the long side too: a 1 x 10^6 strip
        # would become 28 x 28 * 10^6 pixels. The scaled image must fit the same pixel cap.
        short, long = min(width, height), max(width, height)
        scaled = contract.height * int(contract.height * long / short)
        if scaled > contract.max_pixels:
            raise InputError(
                f"image is {width}x{height}: scaling its shorter side to {contract.height} would give "
                f"{scaled} pixels, more than the limit of {contract.max_pixels} (aspect ratio too extreme)"
            )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InputError(f"truncated or corrupt {image.format} image: {exc}") from None
    image = _to_mode(image, contract.mode)
    if (width, height) != (contract.width, contract.height):
        if contract.resize == "refuse":
            raise InputError(
                f"image is {width}x{height}, the bundle takes {contract.width}x{contract.height}; "
                "resize it first (this server refuses other sizes)"
            )
        image = resize_and_crop(image, contract.height)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels)


def decode_base64(text: str) -> bytes:
    """Strict base64 (standard alphabet; a ``data:...;base64,`` prefix and whitespace are allowed)."""
    if not isinstance(text, str):
        raise InputError(f"image must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        head, sep, rest = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise InputError("data URL must be of the form data:<type>;base64,<data>")
        text = rest
    compact = "".join(text.split())
    if not compact:
        raise InputError("empty image: the base64 string is empty")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image is not valid base64: {exc}") from None


def decode_base64_image(text: str, contract: InputContract) -> np.ndarray:
    """:func:`decode_base64` then :func:`decode_image`: ``H x W x C`` uint8."""
    return decode_image(decode_base64(text), contract)


def tensor_from_json(value: Any, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A nested list already in the model's normalised input space, as ``1 x C x H x W`` float32.

    Parameters
    ----------
    value : nested lists of numbers, ``C x H x W`` or ``1 x C x H x W``.
    input_shape : the bundle's ``C, H, W``.

    Raises
    ------
    InputError
        Not a list, ragged or non-numeric entries, the wrong shape, or NaN/infinite values (including
        values too large for float32).
    """
    if not isinstance(value, list):
        raise InputError(f"tensor must be a nested list of numbers, got {type(value).__name__}")
    expected = tuple(int(v) for v in input_shape)
    try:
        # object dtype first: numpy would otherwise read "1.5" and true as numbers without a word
        cells = np.array(value, dtype=object)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InputError(
            f"tensor is not a rectangular array of numbers (ragged or non-numeric): {exc}"
        ) from None
    kinds = {type(v) for v in cells.ravel()}
    if not kinds <= {int, float}:
        names = sorted(k.__name__ for k in kinds - {int, float})
        raise InputError(
            f"tensor is not a rectangular array of numbers (ragged or non-numeric): found {', '.join(names)}"
        )
    try:
        array = cells.astype(np.float64)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InputError(
            f"tensor holds a number beyond the float range ({exc}); values must be finite"
        ) from None
    if array.shape == (1, *expected):
        array = array[0]
    if array.shape != expected:
        raise InputError(
            f"tensor has shape {list(array.shape)}, the bundle takes {list(expected)} (C x H x W) "
            f"or {[1, *expected]}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        single = array.astype(np.float32)
    bad = ~np.isfinite(single)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        values = array[bad]
        kinds = [
            name
            for name, hit in (("NaN", np.isnan(values).any()), ("infinite", (~np.isnan(values)).any()))
            if hit
        ]
        note = " (values beyond the float32 range count as infinite)" if "infinite" in kinds else ""
        raise InputError(
            f"tensor holds {int(bad.sum())} {' or '.join(kinds)} value(s), the first at index {first}{note}; "
            "values must be finite"
        )
    return torch.from_numpy(single).unsqueeze(0)
