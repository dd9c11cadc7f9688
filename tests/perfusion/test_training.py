"""train_concept: what learns, what stays frozen, reproducibility, masks, bad input, step selection."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

import perfusion
from perfusion.errors import TrainingError
from perfusion.tokens import concept_embedding_table
from perfusion.training import initial_concept
from tests.helpers import state_dicts

SHORT = perfusion.TrainConfig(steps=6, batch_size=4)


def test_training_lowers_the_loss_on_the_concept_images(base, covariance, mug_images):
    before = perfusion.denoising_loss(base, initial_concept(base, "<mug-1>", "mug"), mug_images, covariance)
    concept = perfusion.train_concept(
        base, mug_images, "<mug-1>", "mug", perfusion.TrainConfig(steps=40, batch_size=8), covariance=covariance
    )
    after = perfusion.denoising_loss(base, concept, mug_images, covariance)
    assert after < before * 0.995, (before, after)
    assert concept.metadata["loss"]["steps"] == 40


def test_only_the_embedding_row_and_value_targets_learn(base, covariance, mug_images):
    weights_before = state_dicts(base)
    start = initial_concept(base, "<mug-1>", "mug")
    concept = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance)
    # learned: the embedding row and every o*_V (the inverted-trainable-set bug would leave these fixed)
    assert not torch.allclose(concept.embedding, start.embedding)
    for name, value in concept.value_targets.items():
        assert not torch.allclose(value, start.value_targets[name]), name
    # key-locked: no key targets at all; o*_K = W_K i_super is recomputed from the frozen W_K
    assert concept.key_targets is None
    torch.testing.assert_close(concept.superclass_input, start.superclass_input)
    # every base weight bit-identical, and the concept row is gone from the token table afterwards
    for key, tensor in state_dicts(base).items():
        assert torch.equal(tensor, weights_before[key]), key
    assert concept_embedding_table(base.text_encoder).concept_vectors == {}
    assert all(not p.requires_grad for p in base.unet.parameters())


def test_target_input_follows_an_ema_without_gradient(base, covariance, mug_images):
    concept = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance)
    assert not concept.target_input.requires_grad
    moved = (concept.target_input - concept.superclass_input).norm() / concept.superclass_input.norm()
    assert 0 < moved.item() < 0.5  # 6 steps of 0.99-EMA: a small, nonzero pull toward the concept's encoding


def test_training_is_reproducible_and_accumulation_matches_the_full_batch(base, covariance, mug_images):
    config = perfusion.TrainConfig(steps=4, batch_size=4, seed=7)
    first = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", config, covariance=covariance)
    second = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", config, covariance=covariance)
    assert torch.equal(first.embedding, second.embedding)
    assert all(torch.equal(first.value_targets[n], second.value_targets[n]) for n in first.value_targets)
    assert first.to_bytes() == second.to_bytes()  # the file too, byte for byte
    accumulated = perfusion.train_concept(
        base,
        mug_images,
        "<mug-1>",
        "mug",
        perfusion.TrainConfig(steps=4, batch_size=4, grad_accumulation=2, seed=7),
        covariance=covariance,
    )
    for name in first.value_targets:
        torch.testing.assert_close(accumulated.value_targets[name], first.value_targets[name], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(accumulated.target_input, first.target_input, atol=1e-5, rtol=1e-5)


def test_trained_keys_ablation_learns_key_targets(base, covariance, mug_images):
    config = perfusion.TrainConfig(steps=4, batch_size=4, lock_keys=False)
    concept = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", config, covariance=covariance)
    assert concept.key_targets is not None
    layer_name, layer = next(iter(base.cross_attention_layers().items()))
    locked = layer.to_k.weight @ concept.superclass_input
    assert not torch.allclose(concept.key_targets[layer_name], locked)


def test_full_masks_equal_no_masks_and_masks_must_match_images(base, covariance, mug_images):
    ones = [Image.new("L", image.size, 255) for image in mug_images]
    plain = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance)
    masked = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance, masks=ones)
    assert torch.equal(plain.embedding, masked.embedding)
    half = [Image.new("L", image.size, 0) for image in mug_images]
    for mask in half:
        mask.paste(255, (0, 0, mask.width // 2, mask.height))
    weighted = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance, masks=half)
    assert not torch.equal(plain.embedding, weighted.embedding)
    with pytest.raises(TrainingError, match="3 masks for 4 images"):
        perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance, masks=ones[:3])


def test_a_corrupt_image_fails_before_any_step_and_names_the_file(base, covariance, mug_images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    steps = []
    with pytest.raises(TrainingError, match=r"broken\.png cannot be decoded"):
        perfusion.train_concept(
            base, [*mug_images, str(broken)], "<mug-1>", "mug", SHORT, covariance=covariance, on_step=steps.append
        )
    assert steps == []
    with pytest.raises(TrainingError, match="no training images"):
        perfusion.train_concept(base, [], "<mug-1>", "mug", SHORT, covariance=covariance)


def test_bad_superclass_and_token_are_clear_errors(base, covariance, mug_images):
    with pytest.raises(perfusion.ConceptTokenError, match="superclass '' is empty"):
        perfusion.train_concept(base, mug_images, "<mug-1>", "", SHORT, covariance=covariance)
    with pytest.raises(perfusion.ConceptTokenError, match="collides"):
        perfusion.train_concept(base, mug_images, "mug", "mug", SHORT, covariance=covariance)


def test_multi_token_superclass_trains(base, covariance, mug_images):
    concept = perfusion.train_concept(base, mug_images, "<bear-1>", "teddy bear", SHORT, covariance=covariance)
    assert concept.superclass == "teddy bear" and torch.isfinite(concept.embedding).all()


def test_step_selection_keeps_the_best_scored_step(base, covariance, mug_images):
    config = perfusion.TrainConfig(steps=6, batch_size=4, select_every=2)
    scored: list[int] = []

    def prefer_early(snapshot: perfusion.Concept, step: int) -> float:
        scored.append(step)
        return -step

    steps: list[perfusion.StepInfo] = []
    concept = perfusion.train_concept(
        base, mug_images, "<mug-1>", "mug", config, covariance=covariance, scorer=prefer_early, on_step=steps.append
    )
    assert scored == [2, 4, 6]
    assert concept.metadata["selected_step"] == 2
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6] and all(s.steps == 6 for s in steps)
    last = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", config, covariance=covariance)
    assert last.metadata["selected_step"] == 6  # no scorer: the last step
    assert not torch.equal(last.embedding, concept.embedding)


def test_the_embedding_norm_stays_under_its_cap(base, covariance, mug_images):
    start = float(initial_concept(base, "<mug-1>", "mug").embedding.norm())
    fast = {"steps": 8, "batch_size": 4, "lr_embedding": 0.5}  # a large step that would leave the word norms
    free = perfusion.train_concept(
        base,
        mug_images,
        "<mug-1>",
        "mug",
        perfusion.TrainConfig(**fast, embedding_norm_cap=None),
        covariance=covariance,
    )
    capped = perfusion.train_concept(
        base, mug_images, "<mug-1>", "mug", perfusion.TrainConfig(**fast, embedding_norm_cap=1.2), covariance=covariance
    )
    assert float(free.embedding.norm()) > 1.2 * start
    assert float(capped.embedding.norm()) <= 1.2 * start * (1 + 1e-5)
    assert not torch.allclose(capped.embedding, free.embedding)
    with pytest.raises(TrainingError, match="embedding_norm_cap must be > 0"):
        perfusion.TrainConfig(embedding_norm_cap=0)
    with pytest.raises(TrainingError, match="select_every must be >= 1"):
        perfusion.TrainConfig(select_every=-50)


def test_cosine_schedule_settles_the_last_steps(base, covariance, mug_images):
    def trajectory(schedule: str) -> list[torch.Tensor]:
        rows: list[torch.Tensor] = [initial_concept(base, "<mug-1>", "mug").embedding]

        def record(snapshot: perfusion.Concept, step: int) -> float:
            rows.append(snapshot.embedding.detach().clone())
            return 0.0

        config = perfusion.TrainConfig(steps=6, batch_size=4, select_every=1, lr_schedule=schedule)
        perfusion.train_concept(base, mug_images, "<mug-1>", "mug", config, covariance=covariance, scorer=record)
        return [float((b - a).norm()) for a, b in itertools.pairwise(rows)]  # movement per step

    constant, cosine = trajectory("constant"), trajectory("cosine")
    assert cosine[0] == pytest.approx(constant[0], rel=1e-4)  # step 1 runs at the full rate in both
    # step 6 of 6 runs at 0.5 (1 + cos(5 pi / 6)) = 0.067 x the rate (Adam steps scale with the rate)
    assert cosine[-1] < 0.25 * constant[-1], (cosine, constant)
    with pytest.raises(TrainingError, match="lr_schedule must be"):
        perfusion.TrainConfig(lr_schedule="linear")


def test_average_tail_saves_the_mean_of_the_last_steps(base, covariance, mug_images):
    states: list[perfusion.Concept] = []

    def record(snapshot: perfusion.Concept, step: int) -> float:
        states.append(snapshot)
        return 0.0

    fast = {"steps": 6, "batch_size": 4, "select_every": 1}
    perfusion.train_concept(
        base, mug_images, "<mug-1>", "mug", perfusion.TrainConfig(**fast), covariance=covariance, scorer=record
    )
    # averaging changes what is saved, never the trajectory: steps 4, 5, 6 of the same run are averaged
    tail_config = perfusion.TrainConfig(**fast, average_tail=0.5)  # select_every only matters with a scorer
    averaged = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", tail_config, covariance=covariance)
    tail = states[3:]
    torch.testing.assert_close(averaged.embedding, torch.stack([s.embedding for s in tail]).mean(0))
    torch.testing.assert_close(averaged.target_input, torch.stack([s.target_input for s in tail]).mean(0))
    for name, value in averaged.value_targets.items():
        torch.testing.assert_close(value, torch.stack([s.value_targets[name] for s in tail]).mean(0))
    assert not torch.allclose(averaged.embedding, states[-1].embedding)  # not simply the last step
    assert averaged.metadata["train_config"]["average_tail"] == 0.5
    with pytest.raises(TrainingError, match="average_tail must be < 1"):
        perfusion.TrainConfig(average_tail=1.0)


def test_config_errors_are_reported_together():
    with pytest.raises(TrainingError) as error:
        perfusion.TrainConfig(steps=0, batch_size=6, grad_accumulation=4, train_tau=0, method="dreambooth")
    message = str(error.value)
    assert "steps must be >= 1" in message and "multiple of grad_accumulation" in message and "tau" in message
    assert "method must be" in message


def test_concept_metadata_records_the_run(base, covariance, mug_images):
    concept = perfusion.train_concept(base, mug_images, "<mug-1>", "mug", SHORT, covariance=covariance)
    meta = concept.metadata
    assert meta["train_config"]["steps"] == 6 and meta["train_config"]["lr_value"] == 0.03
    assert set(meta["loss"]) == {"first", "last", "min", "mean_last_10pct", "steps"}
    assert meta["device"] == "cpu" and "seconds" not in meta  # the index row has the time, not the file
    assert concept.fingerprint == base.fingerprint
