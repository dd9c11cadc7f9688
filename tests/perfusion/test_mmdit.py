"""The MM-DiT base: its sampler, its rectified-flow training pair, and how load_base treats it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perfusion.errors import BaseModelError
from perfusion.mmdit import flow_training_pair
from perfusion.models import load_base


@pytest.fixture(scope="module")
def tiny_mmdit():
    return load_base("tiny-mmdit")


def test_tiny_mmdit_loads_as_an_mmdit_base(tiny_mmdit) -> None:
    assert tiny_mmdit.architecture == "mmdit"
    assert tiny_mmdit.resolution == 32
    assert not any(p.requires_grad for p in tiny_mmdit.denoiser.parameters())
    assert load_base("tiny-mmdit").fingerprint == tiny_mmdit.fingerprint


def test_a_unet_method_on_an_mmdit_base_is_a_clear_error(tiny_mmdit) -> None:
    with pytest.raises(BaseModelError, match=r"MM-DiT.*zero-shot"):
        _ = tiny_mmdit.unet


def test_the_fingerprint_covers_the_transformer_weights(tiny_mmdit) -> None:
    from perfusion.mmdit import build_tiny_mmdit_pipeline
    from perfusion.models import fingerprint

    other = build_tiny_mmdit_pipeline()
    with torch.no_grad():
        other.transformer.transformer_blocks[0].ff.net[2].weight.add_(0.1)
    assert fingerprint(other) != tiny_mmdit.fingerprint


def test_sampling_is_seeded_per_prompt_and_in_range(tiny_mmdit) -> None:
    sample = tiny_mmdit.pipeline.sample
    pair = sample(["a photo of a dog", "a cat"], seeds=[3, 4], steps=3)
    alone = sample(["a cat"], seeds=[4], steps=3)
    assert pair.shape == (2, 3, 32, 32)
    assert pair.min() >= 0 and pair.max() <= 1
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=0)  # a row does not depend on its neighbours
    assert not torch.allclose(pair[0], sample(["a photo of a dog"], seeds=[5], steps=3)[0])


def test_a_prompt_longer_than_the_text_stream_is_refused(tiny_mmdit) -> None:
    with pytest.raises(ValueError, match="tokens; this base reads 32"):
        tiny_mmdit.pipeline.token_ids(["dog " * 40])


def test_flow_training_pair_is_the_rectified_flow_interpolation() -> None:
    latents = torch.randn(5, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    noisy, sigmas, target = flow_training_pair(latents, generator)
    noise = target + latents  # v = eps - x_0
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * latents + s * noise)
    assert ((sigmas > 0) & (sigmas < 1)).all()


def test_a_few_training_steps_lower_the_flow_loss(tiny_mmdit) -> None:
    from perfusion.mmdit import build_tiny_mmdit_pipeline

    pipeline = build_tiny_mmdit_pipeline()
    transformer = pipeline.transformer
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    latents = torch.randn(8, 4, 16, 16)
    states, pooled = pipeline.encode_prompts(pipeline.token_ids(["a photo of a dog"] * 8))
    generator = torch.Generator().manual_seed(1)
    fixed = flow_training_pair(latents, generator)

    def loss() -> torch.Tensor:
        noisy, sigmas, target = fixed
        return (pipeline.velocity(noisy, sigmas, states, pooled) - target).square().mean()

    first = loss().item()
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.7 * first


def test_missing_toy_mmdit_weights_say_how_to_make_them(tmp_path: Path) -> None:
    from perfusion.toyworld.mmdit_model import build_toy_mmdit_pipeline

    with pytest.raises(BaseModelError, match="pretrain_mmdit"):
        build_toy_mmdit_pipeline(weights=tmp_path / "absent.safetensors")
