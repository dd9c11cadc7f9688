"""The toy model's plumbing: an exact autoencoder in the VAE slot of the stock diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPModel

import perfusion
from perfusion.errors import BaseModelError
from perfusion.toyworld.autoencoder import HaarAutoencoder
from perfusion.toyworld.clip import TOY_CLIP_DIR, load_recipe, read_states
from perfusion.toyworld.model import build_toy_pipeline, toy_text_encoder


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
    layers = base.cross_attention_layers()
    assert len(layers) == 7  # down 16x16 and 8x8, mid 4x4, up 8x8 x2 and 16x16 x2
    assert {layer.to_k.in_features for layer in layers.values()} == {pipeline.text_encoder.config.hidden_size}


def test_the_text_encoder_is_the_toy_clips_text_tower_cut_at_the_layer_the_base_reads():
    """As SD2 ships OpenCLIP's text tower without its last layer: the base reads final_layer_norm(hidden[-2])."""
    text_encoder, tokenizer = toy_text_encoder()
    recipe = load_recipe(TOY_CLIP_DIR)
    clip = CLIPModel.from_pretrained(TOY_CLIP_DIR, dtype=torch.float32).eval()
    assert text_encoder.config.num_hidden_layers == recipe.text_layers + 1 + recipe.read_layer
    ids = tokenizer(["a red star on a blue background", "a ring"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(ids)[0], read_states(clip, ids, recipe.read_layer)[0])


def test_missing_toy_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(BaseModelError, match=r"python -m perfusion\.toyworld\.pretrain"):
        build_toy_pipeline(weights=tmp_path / "toy.safetensors")
    with pytest.raises(BaseModelError, match=r"python -m perfusion\.toyworld\.clip"):
        build_toy_pipeline(clip_dir=tmp_path)


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


def test_a_words_only_encoder_is_zero_from_the_eos_on_and_the_same_before_it():
    text_encoder, tokenizer = toy_text_encoder()
    words_only, _ = toy_text_encoder(text_states="words")
    prompts = ["a red star on a blue background", "a ring", ""]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        everything, words = text_encoder(ids)[0], words_only(input_ids=ids).last_hidden_state
    for row, prompt in enumerate(prompts):
        real = len(prompt.split()) + 1  # BOS and the words; the EOS is next
        torch.testing.assert_close(words[row, :real], everything[row, :real], rtol=0, atol=0)
        assert words[row, real:].abs().max() == 0 and everything[row, real:].abs().min() > 0
    assert words_only.text_states == "words" and not hasattr(text_encoder, "text_states")


def test_the_weights_say_which_text_states_their_unet_reads(tmp_path):
    from safetensors.torch import save_file

    unet = {f"unet.{k}": v.half() for k, v in build_toy_pipeline(weights=None).unet.state_dict().items()}
    save_file(unet, str(tmp_path / "words.safetensors"), metadata={"steps": "1", "text_states": "words"})
    save_file(unet, str(tmp_path / "plain.safetensors"), metadata={"steps": "1"})  # written before the field
    assert build_toy_pipeline(weights=tmp_path / "words.safetensors").text_encoder.text_states == "words"
    assert not hasattr(build_toy_pipeline(weights=tmp_path / "plain.safetensors").text_encoder, "text_states")
    with pytest.raises(BaseModelError, match=r"text_states must be one of \('all', 'words'\), not 'some'"):
        build_toy_pipeline(weights=None, text_states="some")
    save_file(unet, str(tmp_path / "odd.safetensors"), metadata={"text_states": "some"})
    with pytest.raises(BaseModelError, match=r"odd\.safetensors: its metadata says text_states 'some'"):
        build_toy_pipeline(weights=tmp_path / "odd.safetensors")


def test_the_text_states_are_part_of_the_fingerprint():
    from perfusion.models import fingerprint

    plain = build_toy_pipeline(weights=None)
    words = build_toy_pipeline(weights=None, text_states="words")  # the same weights, other encodings
    assert fingerprint(plain) != fingerprint(words)
    assert fingerprint(plain) == fingerprint(build_toy_pipeline(weights=None))
