"""A concept's training images and masks: decoded, resized and center-cropped to the model's resolution,
and masks turned into per-pixel loss weights at latent resolution (paper sec. 4.4)."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from perfusion.errors import TrainingError

ImageInput = Image.Image | str | os.PathLike[str] | np.ndarray | bytes  # bytes: an encoded file (PNG, JPEG...)


class NamedBytes(bytes):
    """An encoded image file's bytes with where they came from (a URI), so errors can name the file."""

    name: str

    def __new__(cls, data: bytes, name: str) -> NamedBytes:
        made = super().__new__(cls, data)
        made.name = name
        return made

    def __reduce__(self) -> tuple[type, tuple[bytes, str]]:
        return (type(self), (bytes(self), self.name))


def image_label(image: ImageInput, index: int) -> str:
    """How an error names an image: its path or URI when known, else its position ("#2")."""
    if isinstance(image, str | os.PathLike):
        return os.fspath(image)
    return image.name if isinstance(image, NamedBytes) else f"#{index}"


def load_image(image: ImageInput, resolution: int, token: str, index: int) -> torch.Tensor:
    """(3, r, r) in [-1, 1]: shorter side resized to r (bicubic), then center-cropped."""
    picture = decode(image, token, index, "RGB")
    array = np.asarray(resize_crop(picture, resolution, Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_mask(mask: ImageInput, resolution: int, token: str, index: int) -> torch.Tensor:
    """(1, r, r) in [0, 1], same geometry as the image."""
    picture = decode(mask, token, index, "L", kind="mask")
    array = np.asarray(resize_crop(picture, resolution, Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(array)[None] / 255.0


def decode(image: ImageInput, token: str, index: int, mode: str | None, kind: str = "image") -> Image.Image:
    """The one place a training image or mask is decoded (TrainingError naming it if it cannot be);
    `mode` None keeps the file's own mode (a caller that must check it)."""
    try:
        if isinstance(image, Image.Image):
            picture = image
        elif isinstance(image, np.ndarray):
            picture = Image.fromarray(image)
        else:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                opened.load()
                picture = opened.copy()
        return picture if mode is None else picture.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as error:
        raise TrainingError(
            f"concept {token!r}: {kind} {image_label(image, index)} cannot be decoded ({error}); replace or remove it"
        ) from error


def resize_crop(picture: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    scale = size / min(picture.size)
    resized = picture.resize(
        (max(size, round(picture.width * scale)), max(size, round(picture.height * scale))), resample
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def mask_weights(masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(n, 1, h, w) loss weights at latent resolution, each normalised by its own max (paper sec. 4.4)."""
    small = F.interpolate(masks, size=(latent_size, latent_size), mode="area")
    peak = small.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 0, small / peak.clamp_min(1e-8), torch.ones_like(small))


def pick_weights(weights: torch.Tensor, picks: list[int], flips: list[bool]) -> torch.Tensor:
    return torch.stack([weights[p].flip(-1) if f else weights[p] for p, f in zip(picks, flips, strict=True)])
