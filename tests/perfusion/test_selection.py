"""A concept's operating point chosen by a scorer: its gate over a grid (choose_gate), its seed and step
(train_selected), scored by CLIP-I and CLIP-T (clip_scorer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import perfusion
from perfusion.clip_scoring import ClipScorer
from perfusion.config import SelectConfig
from perfusion.errors import TrainingError
from perfusion.sampling import RenderRequest, RenderSettings
from perfusion.selection import (
    GATE_GRID,
    SELECTION_CONTEXTS,
    VALIDATION_SEED,
    choose_gate,
    clip_scorer,
    load_scorer_clip,
    train_selected,
)
from perfusion.tokens import concept_embedding_table, temporary_concept_token


def test_the_best_scored_gate_becomes_the_concepts_default_and_survives_the_file(trained_pair, tmp_path):
    mug = trained_pair[0]
    seen = []

    def scorer(concept: perfusion.Concept, step: int) -> float:  # peaks at (0.65, 0.2)
        seen.append((concept.beta, concept.tau))
        return -abs(concept.beta - 0.65) - abs(concept.tau - 0.2)

    chosen = choose_gate(mug, scorer)
    assert (chosen.beta, chosen.tau) == (0.65, 0.2)
    assert seen[0] == (mug.beta, mug.tau) and len(seen) == len(set(seen)) == len(set(GATE_GRID) | {seen[0]})
    assert chosen.embedding is mug.embedding and (mug.beta, mug.tau) != (0.65, 0.2)  # tensors shared, input kept
    selection = chosen.metadata["gate_selection"]
    assert selection["beta"] == 0.65 and selection["score"] == pytest.approx(0.0)
    assert len(selection["scores"]) == len(seen)
    chosen.save(tmp_path / "mug.safetensors")
    loaded = perfusion.load_concept_file((tmp_path / "mug.safetensors").read_bytes(), name="mug")
    assert (loaded.beta, loaded.tau) == (0.65, 0.2) and loaded.metadata["gate_selection"] == selection


def test_ties_keep_the_concepts_own_gate_and_bad_grids_are_refused(trained_pair):
    mug = trained_pair[0]
    same = choose_gate(mug, lambda concept, step: 1.0)
    assert (same.beta, same.tau) == (mug.beta, mug.tau)
    with pytest.raises(TrainingError, match="grid is empty"):
        choose_gate(mug, lambda concept, step: 1.0, grid=())
    with pytest.raises(TrainingError, match="tau > 0"):
        choose_gate(mug, lambda concept, step: 1.0, grid=[(0.7, 0.0)])


TINY_RENDER = RenderSettings(steps=2, guidance_scale=3.0)


def test_the_clip_score_is_the_harmonic_mean_of_clip_i_and_clip_t_and_leaves_a_training_token_alone(
    base, covariance, tiny_clip, trained_pair, mug_images
):
    mug = trained_pair[0]
    clip = ClipScorer.from_folder(tiny_clip)
    score = clip_scorer(base, covariance, clip, mug_images, "mug", samples=2, render=TINY_RENDER)
    training_vector = torch.full_like(mug.embedding, 0.25)
    with temporary_concept_token(base.tokenizer, base.text_encoder, mug.token, training_vector) as token_id:
        value = score(mug, 30)
        # the training's own vector is back in place after the renders (training goes on with it)
        assert torch.equal(concept_embedding_table(base.text_encoder).concept_vectors[token_id], training_vector)

    renderer = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    renderer.attach(mug)
    contexts = [SELECTION_CONTEXTS[k].format(mug.token) for k in range(2)]
    requests = [RenderRequest(f"a photo of {mug.token}", seed=VALIDATION_SEED + k) for k in range(2)]
    requests += [RenderRequest(c, seed=VALIDATION_SEED + 1000 + k) for k, c in enumerate(contexts)]
    images = list(renderer.render_arrays(requests, TINY_RENDER))
    references = [np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)) for image in mug_images]
    clip_i = max(clip.image_similarity(images[:2], references), 0.0)
    clip_t = max(clip.text_similarity(images[2:], [c.replace(mug.token, "mug") for c in contexts]), 0.0)
    expected = 2 * clip_i * clip_t / (clip_i + clip_t) if clip_i + clip_t else 0.0
    assert value == pytest.approx(expected, abs=2e-3)  # references decoded in float vs uint8 here


def test_train_selected_keeps_the_best_seed_and_step_then_its_best_gate(base, covariance, tiny_clip, mug_images):
    config = perfusion.TrainConfig(steps=4, batch_size=2, select_every=2)
    select = SelectConfig(scorer=f"clip:{tiny_clip}", seeds=2, samples=1)
    progress = []
    grid = [(0.6, 0.15), (0.8, 0.1)]
    concept = train_selected(
        perfusion.train_concept, base, mug_images, "<mug-2>", "mug", config, select,
        covariance=covariance, on_step=lambda info: progress.append((info.step, info.steps)), grid=grid,
        render=TINY_RENDER,
    )  # fmt: skip
    chosen = concept.metadata["selection"]
    seed_scores = dict((seed, score) for seed, score in chosen["seed_scores"])
    assert set(seed_scores) == {0, 1} and seed_scores[chosen["seed"]] == max(seed_scores.values())
    assert chosen["step"] in (2, 4) and chosen["step"] == concept.metadata["selected_step"]
    gates = concept.metadata["gate_selection"]
    assert (concept.beta, concept.tau) == (gates["beta"], gates["tau"]) == (chosen["beta"], chosen["tau"])
    assert len(gates["scores"]) == 3  # the concept's own gate, then the two grid points
    assert chosen["score"] == pytest.approx(max(max(seed_scores.values()), gates["score"]))
    assert [step for step, _ in progress] == list(range(1, 9)) and {steps for _, steps in progress} == {8}


def test_a_toy_scorer_on_another_base_and_a_bad_scorer_are_refused(base):
    with pytest.raises(TrainingError, match="toy base only"):
        load_scorer_clip(SelectConfig(scorer="toy"), base)
    with pytest.raises(TrainingError, match="not a scorer"):
        SelectConfig(scorer="bert")
    with pytest.raises(TrainingError, match="seeds must be >= 1"):
        SelectConfig(seeds=0)
