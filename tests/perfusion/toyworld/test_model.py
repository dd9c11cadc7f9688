"""The toy model's plumbing: an exact autoencoder in the VAE slot of the stock diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import perfusion
from perfusion.errors import BaseModelError
from perfusion.toyworld.autoencoder import HaarAutoencoder
from perfusion.toyworld.model import build_toy_pipeline


def test_the_autoencoder_is_exact_and_orthonormal():
    autoencoder = HaarAutoencoder()
    images = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    latents = autoencoder.encode(images).latent_dist.sample()
    assert latents.shape == (3, 12, 16, 16)
    torch.testing.assert_close(autoencoder.decode(latents).sample, images, rtol=0, atol=1e-12)
    assert torch.equal(autoencoder.encode(images).latent_dist.std, torch.zeros_like(latents))
    # Orthonormal: energy is kept, so white noise stays white noise of the same variance.
    torch.testing.assert_close(latents.square().sum(), images.square().sum())


def test_a_flat_color_is_the_low_band_alone():
    """Why Haar rather than pixel-unshuffle: a flat region has no detail coefficients to get wrong."""
    images = torch.zeros(1, 3, 32, 32)
    images[:, 0], images[:, 1], images[:, 2] = 0.8, -0.4, 0.1
    latents = HaarAutoencoder().encode(images).latent_dist.sample().reshape(1, 3, 4, 16, 16)
    torch.testing.assert_close(latents[:, :, 0, 0, 0], torch.tensor([[1.6, -0.8, 0.2]]))  # LL = 2 x the color
    assert latents[:, :, 1:].abs().max() < 1e-6  # LH, HL, HH


def test_the_stock_pipeline_renders_with_it_and_perfusion_attaches():
    pipeline = build_toy_pipeline(weights=None)  # random weights: plumbing only
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 2
    out = pipeline(
        prompt=["a red circle on a white background"],
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(0)],
    )
    assert np.asarray(out.images).shape == (1, 32, 32, 3)
    base = perfusion.BaseModel(pipeline, "toy(random)", perfusion.models.fingerprint(pipeline))
    assert len(base.cross_attention_layers()) == 7  # down 8x8 and 4x4, mid, up 4x4 x2 and 8x8 x2


def test_missing_toy_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(BaseModelError, match=r"python -m perfusion\.toyworld\.pretrain"):
        build_toy_pipeline(weights=tmp_path / "toy.safetensors")


def test_the_shipped_toy_model_loads_and_renders():
    base = perfusion.load_base("toy")
    assert base.resolution == 32 and len(base.cross_attention_layers()) == 7
    assert perfusion.load_base("toy").fingerprint == base.fingerprint
    out = base.pipeline(
        prompt=["a red circle on a white background"],
        num_inference_steps=4,
        output_type="np",
        generator=[torch.Generator().manual_seed(0)],
    )
    image = np.asarray(out.images)[0]
    assert image.shape == (32, 32, 3) and image.min() >= 0.0 and image.max() <= 1.0
