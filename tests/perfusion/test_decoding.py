"""What a product photo's pixels mean: 16-bit grayscale, transparency, animation, floats and bombs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from perfusion.decoding import UnusableImage, decode_picture
from perfusion.errors import TrainingError
from perfusion.images import training_pixels


def encoded(picture: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_a_16_bit_grayscale_png_keeps_its_gray_levels():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    data = encoded(Image.fromarray(ramp))
    rgb = np.asarray(decode_picture(data, "RGB")).astype(int)
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255  # not a solid white square
    assert np.abs(rgb[..., 0] - np.round(ramp / 257)).max() <= 1
    assert 100 < rgb.mean() < 155  # the ramp's mid-gray mean


def test_transparency_is_white_and_becomes_the_mask():
    photo = np.zeros((16, 16, 4), np.uint8)
    photo[..., 0] = 200  # a red product ...
    photo[4:12, 4:12, 3] = 255  # ... opaque in the middle, transparent around it
    data = encoded(Image.fromarray(photo, "RGBA"))
    rgb = np.asarray(decode_picture(data, "RGB"))
    assert (rgb[0, 0] == 255).all()  # transparent: white, not black
    assert tuple(rgb[8, 8]) == (200, 0, 0)
    opaque = encoded(Image.new("RGB", (16, 16), (0, 0, 255)))
    pixels, weights = training_pixels([data, opaque], None, 16, "<p>")
    assert pixels.shape == (2, 3, 16, 16) and weights is not None and weights.shape == (2, 1, 16, 16)
    assert weights[0, 0, 8, 8] == 1 and weights[0, 0, 0, 0] == 0  # the alpha channel
    assert torch.equal(weights[1], torch.ones(1, 16, 16))  # no alpha: the whole photo counts
    assert training_pixels([opaque], None, 16, "<p>")[1] is None  # no transparency anywhere: no mask
    mask = encoded(Image.new("L", (16, 16), 128))
    assert torch.allclose(training_pixels([data], [mask], 16, "<p>")[1], torch.full((1, 1, 16, 16), 128 / 255))


def test_animated_float_and_bomb_images_are_refused(monkeypatch):
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "blue", "green")]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(UnusableImage, match=r"is animated \(3 frames\)"):
        decode_picture(gif, "RGB")
    with pytest.raises(TrainingError, match=r"concept '<p>': image #1 is animated"):
        training_pixels([encoded(frames[0]), gif], None, 16, "<p>")
    floats = encoded(Image.fromarray(np.ones((16, 16), np.float32)), "TIFF")
    with pytest.raises(UnusableImage, match="floating-point image"):
        decode_picture(floats, "RGB")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 file now decompresses past 2x the guard
    with pytest.raises(UnusableImage, match=r"cannot be decoded.*decompression bomb"):
        decode_picture(encoded(Image.new("RGB", (64, 64))), "RGB")
