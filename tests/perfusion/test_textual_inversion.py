"""The textual-inversion baseline: an embedding-only concept, trained and rendered by the same code."""

from __future__ import annotations

import numpy as np
import torch

import perfusion
from perfusion.tokens import add_concept_token
from tests.helpers import state_dicts

TI = perfusion.TrainConfig(steps=6, batch_size=4, method="textual_inversion")


def test_textual_inversion_trains_only_the_embedding_row(base, covariance, mug_images, tmp_path):
    weights = state_dicts(base)
    concept = perfusion.train_concept(base, mug_images, "<ti-1>", "mug", TI, covariance=covariance)
    assert not concept.edits and concept.value_targets == {} and concept.key_targets is None
    start = perfusion.training.initial_concept(base, "<ti-1>", "mug", TI)
    assert not torch.equal(concept.embedding, start.embedding)
    assert all(torch.equal(v, weights[k]) for k, v in state_dicts(base).items())
    path = tmp_path / "ti.safetensors"
    concept.save(path, dtype=torch.float32)
    loaded = perfusion.load_concept(path, base)
    assert not loaded.edits and torch.equal(loaded.embedding, concept.embedding)
    assert loaded.metadata["train_config"]["method"] == "textual_inversion"


def test_an_embedding_only_concept_renders_through_its_token_alone(covariance, mug_images, trained_pair):
    trainer = perfusion.load_base("tiny")
    concept = perfusion.train_concept(trainer, mug_images, "<ti-1>", "mug", TI, covariance=covariance)
    settings = perfusion.RenderSettings(steps=6)
    renderer = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    renderer.attach(concept)
    renderer.attach(trained_pair[0])
    requests = [
        perfusion.RenderRequest("a photo of <ti-1>", seed=4),
        perfusion.RenderRequest("<ti-1> next to <mug-1>", seed=5),
    ]
    mixed = renderer.render_arrays(requests, settings)
    alone = np.concatenate([renderer.render_arrays([r], settings) for r in requests])
    assert np.abs(mixed - alone).max() < 1e-5
    # the same picture as a stock pipeline that only knows the token's embedding
    plain = perfusion.load_base("tiny")
    add_concept_token(plain.tokenizer, plain.text_encoder, "<ti-1>", concept.embedding)
    expected = plain.pipeline(
        prompt="a photo of <ti-1>",
        num_inference_steps=6,
        guidance_scale=settings.guidance_scale,
        generator=[torch.Generator().manual_seed(4)],
        output_type="np",
    ).images
    assert np.abs(mixed[0] - expected[0]).max() < 1e-5
