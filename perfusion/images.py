"""A concept's training images and masks: decoded, resized and center-cropped to the model's resolution,
and masks turned into per-pixel loss weights at latent resolution (paper sec. 4.4)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from perfusion.decoding import ImageInput, NamedBytes, alpha, decode, image_label
from perfusion.errors import TrainingError

__all__ = ["ImageInput", "NamedBytes", "decode", "image_label", "training_pixels"]


def training_pixels(
    images: list[ImageInput], masks: list[ImageInput] | None, resolution: int, token: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels (n, 3, r, r) in [-1, 1], per-pixel weights (n, 1, r, r) in [0, 1] or None) of a concept's
    photos. Weights: the masks when given; else, when a photo has transparency, its alpha channel (a photo
    without any gets all ones, which mask_weights reads as no mask); else None."""
    if masks is not None and len(masks) != len(images):
        raise TrainingError(f"concept {token!r}: {len(masks)} masks for {len(images)} images; give one per image")
    pixels = torch.stack([load_image(image, resolution, token, i) for i, image in enumerate(images)])
    if masks is not None:
        return pixels, torch.stack([load_mask(m, resolution, token, i) for i, m in enumerate(masks)])
    alphas = [alpha(decode(image, token, i, None)) for i, image in enumerate(images)]
    if all(a is None for a in alphas):
        return pixels, None
    ones = torch.ones(1, resolution, resolution)
    return pixels, torch.stack([ones if a is None else _mask_array(a, resolution) for a in alphas])


def load_image(image: ImageInput, resolution: int, token: str, index: int) -> torch.Tensor:
    """(3, r, r) in [-1, 1]: shorter side resized to r (bicubic), then center-cropped."""
    picture = decode(image, token, index, "RGB")
    array = np.asarray(resize_crop(picture, resolution, Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_mask(mask: ImageInput, resolution: int, token: str, index: int) -> torch.Tensor:
    """(1, r, r) in [0, 1], same geometry as the image."""
    return _mask_array(decode(mask, token, index, "L", kind="mask"), resolution)


def _mask_array(picture: Image.Image, resolution: int) -> torch.Tensor:
    array = np.asarray(resize_crop(picture, resolution, Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(array)[None] / 255.0


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
