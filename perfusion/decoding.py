"""Decoding a product photo or mask: the one policy for what a file's pixels mean. Pillow and numpy only
(no torch), so planning checks a catalog's images with the very rules training applies.

- 16-bit (and 32-bit integer) grayscale is scaled to 8 bits. Pillow's own convert() clips it at 255, which
  turns a 16-bit PNG into a white square.
- Transparency (RGBA, LA, a palette with a transparent colour) is composited over white, the product-shot
  background, instead of Pillow's black; `alpha()` gives the alpha channel itself, which training uses as
  the concept's mask when none is given (perfusion/images.py).
- An animated image (GIF, APNG, WebP) is refused: which frame is the product is not ours to guess.
- A floating-point image is refused: its range is not defined by the file.
- A decompression bomb (more pixels than Pillow's MAX_IMAGE_PIXELS guard) is refused like any corrupt file.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from perfusion.errors import TrainingError

ImageInput = Image.Image | str | os.PathLike[str] | np.ndarray | bytes  # bytes: an encoded file (PNG, JPEG...)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, TypeError, Image.DecompressionBombError)


class NamedBytes(bytes):
    """An encoded image file's bytes with where they came from (a URI), so errors can name the file."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        made = super().__new__(cls, data)
        made.name = name
        return made

    def __reduce__(self) -> tuple[type, tuple[bytes, str]]:
        return (type(self), (bytes(self), self.name))


def image_label(image: Any, index: int) -> str:
    """How an error names an image: its path or URI when known, else its position ("#2")."""
    if isinstance(image, str | os.PathLike):
        return os.fspath(image)
    return image.name if isinstance(image, NamedBytes) else f"#{index}"


class UnusableImage(ValueError):
    """Why a file's pixels cannot be used (decode_picture); decode() names the concept and file around it."""


def decode(image: ImageInput, token: str, index: int, mode: str | None, kind: str = "image") -> Image.Image:
    """decode_picture, with TrainingError naming the concept and the file."""
    try:
        return decode_picture(image, mode)
    except UnusableImage as error:
        raise TrainingError(f"concept {token!r}: {kind} {image_label(image, index)} {error}") from error


def decode_picture(image: ImageInput, mode: str | None) -> Image.Image:
    """The picture in `mode` ("RGB", "L"; None: as decoded, 8-bit), by the module's rules; UnusableImage
    saying why not."""
    try:
        picture, frames = _open(image)
    except DECODE_ERRORS as error:
        raise UnusableImage(f"cannot be decoded ({error}); replace or remove it") from error
    if frames > 1:
        raise UnusableImage(f"is animated ({frames} frames): export the product's frame as a still image")
    picture = eight_bit(picture)
    if mode is None:
        return picture
    if mode == "RGB" and has_alpha(picture):
        return over_white(picture)
    return picture.convert(mode)


def _open(image: ImageInput) -> tuple[Image.Image, int]:
    """(the decoded picture, its number of frames)."""
    if isinstance(image, Image.Image):
        return image, int(getattr(image, "n_frames", 1))
    if isinstance(image, np.ndarray):
        return Image.fromarray(image), 1
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        opened.load()
        return opened.copy(), int(getattr(opened, "n_frames", 1))


def eight_bit(picture: Image.Image) -> Image.Image:
    """Integer grayscale of more than 8 bits scaled to 8 (16-bit range: / 257); UnusableImage for floats."""
    if picture.mode == "F":
        raise UnusableImage("is a floating-point image (no defined range): save it as an 8- or 16-bit PNG or a JPEG")
    if picture.mode.startswith("I"):  # "I", "I;16", "I;16B", ...: 16-bit PNGs and TIFFs
        values = np.asarray(picture).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return picture


def has_alpha(picture: Image.Image) -> bool:
    """Whether any pixel is transparent (an alpha channel that is all opaque does not count)."""
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        lowest = picture.convert("RGBA").getchannel("A").getextrema()[0]  # (min, max) of one 8-bit channel
        return isinstance(lowest, int) and lowest < 255
    return False


def alpha(picture: Image.Image) -> Image.Image | None:
    """The alpha channel ("L", 255 opaque) of a picture with transparency, else None."""
    return picture.convert("RGBA").getchannel("A") if has_alpha(picture) else None


def over_white(picture: Image.Image) -> Image.Image:
    """An RGB picture of `picture` composited over a white background."""
    rgba = picture.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
