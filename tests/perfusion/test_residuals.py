"""Personalized Residuals (RESIDUALS.md): the residual's math, its file, localized attention-guided sampling,
batches that mix both methods, and every bad input the issue names."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import perfusion
from perfusion.errors import ConceptFileError, RenderError, TrainingError
from perfusion.residual_layers import ResidualCall, concept_positions, install_residual_hooks
from perfusion.residual_training import initial_residual_concept, train_residual_concept
from perfusion.residuals import load_residual_concept, projection_shape, rank_for, transformer_blocks
from perfusion.tokens import concept_embedding_table

RESIDUAL_FAST = perfusion.TrainConfig.for_method(method="residuals", steps=30, lr_residual=1e-2)
STEPS = perfusion.RenderSettings(steps=4, batch_size=8)


@pytest.fixture(scope="module")
def residual_mug(mug_images):
    return train_residual_concept(perfusion.load_base("tiny"), mug_images, "<mug-r>", "mug", RESIDUAL_FAST)


def test_ranks_follow_the_paper_and_sd15_has_about_1_24m_parameters():
    assert [rank_for(m, 0.05) for m in (320, 640, 1280)] == [16, 32, 64]
    sd15 = [320] * 5 + [640] * 5 + [1280] * 6  # proj_out channels of SD1.5's 16 transformer blocks
    parameters = sum(2 * m * rank_for(m, 0.05) for m in sd15)
    assert 1.2e6 < parameters < 1.3e6


def test_the_paper_recipe_is_the_residual_default_and_given_fields_win():
    config = perfusion.TrainConfig.for_method(method="residuals")
    assert (config.steps, config.batch_size, config.lr_residual, config.residual_rank) == (150, 4, 1e-3, 0.05)
    assert perfusion.TrainConfig.for_method(method="residuals", steps=60).steps == 60
    assert perfusion.TrainConfig.for_method().steps == perfusion.TrainConfig().steps  # Perfusion's own


def test_training_learns_only_the_residuals_and_leaves_the_base_bit_identical(mug_images):
    base = perfusion.load_base("tiny")
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    concept = train_residual_concept(base, mug_images, "<mug-r>", "mug", RESIDUAL_FAST)
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
    assert all(torch.equal(text_before[k], v) for k, v in base.text_encoder.state_dict().items())
    assert not concept_embedding_table(base.text_encoder).concept_vectors  # the token's row is removed again
    blocks = transformer_blocks(base.unet)
    assert concept.block_names == list(blocks)
    for name, block in blocks.items():
        out, inner = projection_shape(block)
        assert concept.up[name].shape == (out, rank_for(out, 0.05)) and concept.down[name].shape[1] == inner
    assert all(float(a.abs().max()) > 0 for a in concept.up.values())  # A started at 0 and learned
    initial = initial_residual_concept(base, "<mug-r>", "mug", RESIDUAL_FAST)
    assert torch.equal(concept.embedding, initial.embedding.cpu())  # the token's row is kept by default
    assert concept.metadata["loss"]["steps"] == 30.0
    again = train_residual_concept(base, mug_images, "<mug-r>", "mug", RESIDUAL_FAST)
    assert again.to_bytes() == concept.to_bytes()  # same inputs, same file, byte for byte


def test_lag_off_is_the_unet_with_w_plus_a_b_and_rows_without_the_concept_are_the_base():
    base = perfusion.load_base("tiny")
    concept = initial_residual_concept(base, "<mug-r>", "mug", RESIDUAL_FAST)
    generator = torch.Generator().manual_seed(0)
    concept.up = {n: torch.randn(a.shape, generator=generator) * 0.1 for n, a in concept.up.items()}
    perfusion.install_processors(base.unet)
    install_residual_hooks(base.unet)
    merged = perfusion.load_base("tiny").unet  # the same weights, with W + A B written into every proj_out
    with torch.no_grad():
        for name, block in transformer_blocks(merged).items():
            block.proj_out.weight[:, :, 0, 0] += concept.up[name] @ concept.down[name]
    size = base.unet.config.sample_size
    noisy = torch.randn(2, base.unet.config.in_channels, size, size, generator=generator)
    encodings = torch.randn(2, 77, base.unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([500, 500])
    call = ResidualCall.build([[concept], []])  # row 0 has the concept, row 1 none
    with torch.no_grad():
        edited = base.unet(noisy, timesteps, encodings, cross_attention_kwargs={"residuals": call}).sample
        expected = merged(noisy, timesteps, encodings).sample
        plain = base.unet(noisy, timesteps, encodings).sample
    assert torch.allclose(edited[0], expected[0], atol=1e-5)
    assert not torch.allclose(edited[0], plain[0], atol=1e-3)
    assert torch.equal(edited[1], plain[1])  # a row without the concept: the base UNet exactly


def test_lag_masks_are_the_per_image_median_of_the_concept_and_class_attention():
    ids = torch.tensor([[0, 5, 9, 7, 8, 1], [0, 5, 3, 9, 7, 1]])  # token 9, macro class phrase [7]
    assert concept_positions(ids[0], 9, [7]).tolist() == [0, 0, 1, 1, 0, 0]
    assert concept_positions(ids[1], 9, [7]).tolist() == [0, 0, 0, 1, 1, 0]
    concept = initial_residual_concept(perfusion.load_base("tiny"), "<mug-r>", "mug", RESIDUAL_FAST)
    # UNet batch [negative row, positive row] of one request: the positive row's map serves both
    call = ResidualCall.build(
        [[concept], [concept]],
        prompt_ids=ids,
        token_phrases={"<mug-r>": (9, [7])},
        mask_rows=torch.tensor([1, 1]),
    )
    probabilities = torch.zeros(2, 4, 6)
    probabilities[1, :, 3] = torch.tensor([0.1, 0.5, 0.2, 0.9])  # the positive row's attention at "9"
    probabilities[1, :, 4] = torch.tensor([0.0, 0.0, 0.3, 0.0])  # ... and at its class word
    probabilities[0, :, 2] = 1.0  # the negative row attends elsewhere: ignored
    call.begin_block("down_blocks.0.attentions.0")
    call.observe("down_blocks.0.attentions.0.transformer_blocks.0.attn2", probabilities)
    masks = call.masks("down_blocks.0.attentions.0", 4)  # A_C = [0.1, 0.5, 0.5, 0.9], lower median 0.5
    assert masks[:, :, 0].tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]


def test_a_residual_file_round_trips_and_says_its_method(residual_mug):
    base = perfusion.load_base("tiny")
    data = residual_mug.to_bytes(torch.float32)
    assert perfusion.methods.file_method(data).name == "residuals"
    loaded = perfusion.load_concept_file(data, base, name="mug.safetensors")
    assert loaded.method == "residuals" and loaded.ranks == residual_mug.ranks
    assert all(torch.equal(loaded.up[n], residual_mug.up[n]) for n in residual_mug.up)
    fp16 = residual_mug.to_bytes()
    assert len(fp16) < len(data) and len(fp16) > 2 * residual_mug.parameters  # 2 bytes a parameter + header


def test_a_file_of_one_method_loaded_as_the_other_is_named(residual_mug, trained_pair):
    with pytest.raises(ConceptFileError, match=r"mug.safetensors: .*not a Perfusion concept.*residual-concept"):
        perfusion.load_concept(residual_mug.to_bytes(), name="mug.safetensors")
    with pytest.raises(ConceptFileError, match=r"bag.safetensors: .*not a residual concept.*perfusion-concept"):
        load_residual_concept(trained_pair[1].to_bytes(), name="bag.safetensors")


def test_a_residual_concept_for_another_base_is_refused(residual_mug):
    other = dataclasses.replace(residual_mug, blocks_fingerprint="f" * 32)
    with pytest.raises(ConceptFileError, match=r"x.safetensors: a residual concept trained on .* retrain"):
        perfusion.load_concept_file(other.to_bytes(), perfusion.load_base("tiny"), name="x.safetensors")
    base = perfusion.load_base("tiny")
    renderer = perfusion.ConceptRenderer(base, perfusion.estimate_covariance(base))
    with pytest.raises(ConceptFileError, match="retrain the concept"):
        renderer.attach(other)


def test_a_rank_that_does_not_fit_the_layer_is_refused(residual_mug):
    name = residual_mug.block_names[0]
    channels = residual_mug.down[name].shape[1]
    too_big = dataclasses.replace(
        residual_mug,
        up={**residual_mug.up, name: torch.zeros(channels, channels + 1)},
        down={**residual_mug.down, name: torch.zeros(channels + 1, channels)},
    )
    with pytest.raises(ConceptFileError, match=rf"{name} has rank {channels + 1}, more than its {channels}-channel"):
        perfusion.load_concept_file(too_big.to_bytes(), perfusion.load_base("tiny"), name="big.safetensors")
    with pytest.raises(TrainingError, match="residual_rank must be <= 1"):
        perfusion.TrainConfig(method="residuals", residual_rank=1.5)


def test_a_misspelled_method_is_named():
    with pytest.raises(TrainingError, match=r"method must be one of 'perfusion', 'textual_inversion', 'residuals'"):
        perfusion.TrainConfig(method="residual")
    with pytest.raises(TrainingError, match="unknown method 'residual'"):
        perfusion.methods.method_named("residual")


def test_selection_and_gates_are_refused_for_residual_concepts(mug_images, residual_mug, covariance):
    with pytest.raises(TrainingError, match=r"step selection .* Perfusion concepts only"):
        train_residual_concept(
            perfusion.load_base("tiny"), mug_images, "<mug-r>", "mug", RESIDUAL_FAST, scorer=lambda c, s: 0.0
        )
    renderer = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    renderer.attach(residual_mug)
    with pytest.raises(RenderError, match="residual concepts have no gate"):
        renderer.render([perfusion.RenderRequest("a photo of <mug-r>", gates={"<mug-r>": (0.5, 0.1)})], STEPS)


def test_the_macro_class_follows_a_residual_token_in_the_rendered_prompt(residual_mug, covariance):
    renderer = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    renderer.attach(residual_mug)
    assert renderer.prompt_for(perfusion.RenderRequest("<mug-r> on a table")) == "<mug-r> mug on a table"
    assert renderer.prompt_for(perfusion.RenderRequest("a <mug-r> mug")) == "a <mug-r> mug"


def test_a_batch_mixing_both_methods_equals_each_row_rendered_alone(residual_mug, trained_pair, covariance):
    base = perfusion.load_base("tiny")
    renderer = perfusion.ConceptRenderer(base, covariance)
    renderer.attach(residual_mug)
    renderer.attach(trained_pair[1])  # Perfusion's <bag-1>
    second = dataclasses.replace(residual_mug, token="<mug-s>", up={n: -a for n, a in residual_mug.up.items()})
    renderer.attach(second)
    requests = [
        perfusion.RenderRequest("a photo of <mug-r> on a table", seed=1),
        perfusion.RenderRequest("a photo of <bag-1>", seed=2),
        perfusion.RenderRequest("<mug-r> next to <bag-1>", seed=3),
        perfusion.RenderRequest("<mug-s> and <mug-r>", seed=4),
        perfusion.RenderRequest("a photo of a mug", seed=5),
    ]
    for localized in (True, False):
        settings = dataclasses.replace(STEPS, localized=localized)
        mixed = renderer.render_arrays(requests, settings)
        alone = np.concatenate([renderer.render_arrays([r], settings) for r in requests])
        assert np.abs(mixed - alone).max() < 1e-5
    plain = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    assert np.abs(plain.render_arrays(requests[-1:], STEPS) - mixed[-1:]).max() < 1e-5  # no concept: the base


def test_lag_changes_the_render_only_where_the_concept_is_attended(residual_mug, covariance):
    renderer = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    renderer.attach(residual_mug)
    request = [perfusion.RenderRequest("a photo of <mug-r> on a table", seed=1)]
    localized = renderer.render_arrays(request, STEPS)
    everywhere = renderer.render_arrays(request, dataclasses.replace(STEPS, localized=False))
    plain = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    plain.attach(dataclasses.replace(residual_mug, up={n: torch.zeros_like(a) for n, a in residual_mug.up.items()}))
    base_render = plain.render_arrays(request, STEPS)  # the same prompt with a zero residual: the base's prior
    assert np.abs(localized - everywhere).max() > 1e-3
    # with LAG the render stays closer to the base model's own than with the residual everywhere
    assert np.abs(localized - base_render).mean() < np.abs(everywhere - base_render).mean()
