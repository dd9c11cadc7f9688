"""Regression tests for defects found in review: schedulers, half precision, shared token tables,
autocast, global-lock alignment, and exact EMA / Gaussian-noise checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

import perfusion
from perfusion.errors import RenderError
from perfusion.rank1 import build_edit_basis, edit_projection
from perfusion.tokens import add_concept_token
from perfusion.training import initial_concept
from tests.helpers import random_vectors

TWO_STEPS = perfusion.TrainConfig(steps=2, batch_size=4)


def test_training_does_not_depend_on_the_pipelines_sampler(base, covariance, mug_images):
    """The forward process is DDPM with the scheduler's betas, so an Euler sampler, or a render that
    called set_timesteps() first, changes nothing."""
    reference = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", TWO_STEPS, covariance=covariance)
    euler = perfusion.load_base("tiny")
    euler.pipeline.scheduler = EulerDiscreteScheduler.from_config(euler.pipeline.scheduler.config)
    euler.pipeline.scheduler.set_timesteps(5)
    trained = perfusion.train_concept(euler, mug_images, "<mug-1>", "mug", TWO_STEPS, covariance=covariance)
    assert torch.equal(trained.embedding, reference.embedding)
    assert perfusion.denoising_loss(euler, trained, mug_images, covariance) == pytest.approx(
        perfusion.denoising_loss(base, reference, mug_images, covariance)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_a_half_precision_base(covariance, mug_images, dtype):
    half = perfusion.load_base("tiny", dtype=dtype)
    concept = perfusion.train_concept(half, mug_images, "<mug-1>", "mug", TWO_STEPS, covariance=covariance)
    start = initial_concept(half, "<mug-1>", "mug")
    assert torch.isfinite(concept.embedding).all() and not torch.equal(concept.embedding, start.embedding)
    assert np.isfinite(perfusion.denoising_loss(half, concept, mug_images, covariance))


def test_training_and_loss_evaluation_leave_an_attached_concept_in_place(base, covariance, trained_pair, mug_images):
    renderer = perfusion.ConceptRenderer(base, covariance)
    renderer.attach(trained_pair[0])
    request = [perfusion.RenderRequest("a photo of <mug-1>", seed=1)]
    before = renderer.render_arrays(request, perfusion.RenderSettings(steps=4))
    perfusion.denoising_loss(base, trained_pair[0], mug_images, covariance)
    perfusion.train_concept(base, mug_images, "<mug-1>", "mug", TWO_STEPS, covariance=covariance)
    assert np.array_equal(renderer.render_arrays(request, perfusion.RenderSettings(steps=4)), before)


def test_the_edit_is_computed_in_float32_inside_autocast(covariance):
    e = random_vectors(12, 32, 1).float()[None]
    weight = random_vectors(16, 32, 2).float()
    basis = build_edit_basis([[(random_vectors(1, 32, 3)[0], 0.7, 0.15)]], covariance.c_inv, covariance.cholesky)
    targets = random_vectors(1, 16, 4).float()[None]
    projected = e @ weight.T
    plain = edit_projection(e, projected, weight, basis, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = edit_projection(e, projected, weight, basis, targets)
    torch.testing.assert_close(autocast, plain, atol=0, rtol=0)


def test_basis_accepts_trainable_concept_tensors(covariance):
    i_star = torch.nn.Parameter(random_vectors(1, 32, 5)[0].float())
    basis = build_edit_basis([[(i_star, 0.7, 0.15)]], covariance.c_inv, covariance.cholesky)
    assert basis.projection_basis.device.type == "cpu" and not basis.projection_basis.requires_grad


def test_global_locking_keys_read_the_superclass_prompt_at_aligned_positions(base, covariance):
    """K input at the concept token = the encoding of the LAST superclass token ("bear") in the
    substituted prompt; later tokens shift by the phrase length."""
    bag = initial_concept(base, "<bag-1>", "teddy bear")
    renderer = perfusion.ConceptRenderer(base, covariance)
    renderer.attach(bag)
    ids = renderer._tokenize(["a photo of <bag-1> in a kitchen"])
    superclass_ids = renderer._tokenize(["a photo of teddy bear in a kitchen"])
    with torch.no_grad():
        positive = base.text_encoder(ids)[0]
        keys = renderer._superclass_encodings(ids, positive, [[bag]])
        superclass = base.text_encoder(superclass_ids)[0]
    position = ids[0].tolist().index(base.tokenizer.convert_tokens_to_ids("<bag-1>"))
    torch.testing.assert_close(keys[0, position], superclass[0, position + 1])  # "bear"
    torch.testing.assert_close(keys[0, position + 1], superclass[0, position + 2])  # "in"
    torch.testing.assert_close(keys[0, :position], superclass[0, :position])  # the words before
    # a concept the row does not use is not substituted
    mug = initial_concept(base, "<mug-1>", "mug")
    renderer.attach(mug)
    both = renderer._tokenize(["<mug-1> next to <bag-1>"])
    with torch.no_grad():
        encoded = base.text_encoder(both)[0]
        only_bag = renderer._superclass_encodings(both, encoded, [[bag]])
    torch.testing.assert_close(only_bag[0, 1], encoded[0, 1])  # <mug-1> kept as is


def test_target_input_ema_is_exact(base, covariance, mug_images):
    """One step, one template: i* = 0.99 i_super + 0.01 e(concept token), computed independently."""
    config = perfusion.TrainConfig(steps=1, batch_size=4, templates=("a photo of a {}",))
    start = initial_concept(base, "<mug-1>", "mug", config)
    concept = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", config, covariance=covariance)
    token_id = add_concept_token(base.tokenizer, base.text_encoder, "<mug-1>", start.embedding)
    ids = base.tokenizer("a photo of a <mug-1>", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        at_token = base.text_encoder(ids)[0][0, ids[0].tolist().index(token_id)]
    torch.testing.assert_close(concept.target_input, 0.99 * start.superclass_input + 0.01 * at_token)


def test_training_noise_has_gaussian_statistics(base, covariance, mug_images, monkeypatch):
    """Uniform noise (a bug in public re-implementations) has std 0.58 and kurtosis 1.8 on [-1, 1]."""
    drawn: list[torch.Tensor] = []
    original = DDPMScheduler.add_noise

    def spy(self, original_samples, noise, timesteps):
        drawn.append(noise.detach().flatten())
        return original(self, original_samples, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", spy)
    perfusion.train_concept(
        base, mug_images, "<mug-1>", "mug", perfusion.TrainConfig(steps=3, batch_size=8), covariance=covariance
    )
    noise = torch.cat(drawn)
    standardised = (noise - noise.mean()) / noise.std()
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    assert abs((standardised**4).mean().item() - 3.0) < 0.3


def test_a_negative_prompt_with_an_unattached_concept_token_is_refused(base, covariance, trained_pair):
    renderer = perfusion.ConceptRenderer(base, covariance)
    renderer.attach(trained_pair[0])
    add_concept_token(base.tokenizer, base.text_encoder, "<ghost-1>", torch.zeros(32))
    renderer.detach("<ghost-1>")
    with pytest.raises(RenderError, match="not attached"):
        renderer.render([perfusion.RenderRequest("a photo of <mug-1>", negative_prompt="<ghost-1>")])
