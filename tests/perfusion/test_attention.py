"""The cross-attention processor: exactness without concepts, key locking, per-position state, global locking."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import perfusion.attention as attention_module
from perfusion import ConceptRenderer, RenderRequest, RenderSettings
from perfusion.attention import PerfusionCall, install_processors
from perfusion.errors import RenderError
from perfusion.rank1 import gate, similarity
from perfusion.tokens import add_concept_token
from perfusion.training import initial_concept


def _unet_inputs(seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=generator), torch.full((batch,), 400)


def _encode(base, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = base.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, base.text_encoder(ids)[0]


@pytest.fixture
def recorded(monkeypatch):
    """Record every edited projection: (weight id) -> output (b, m, o)."""
    records: dict[int, torch.Tensor] = {}
    original = attention_module.edit_projection

    def recording(encodings, projected, weight, basis, targets):
        out = original(encodings, projected, weight, basis, targets)
        records[id(weight)] = out.detach().clone()
        return out

    monkeypatch.setattr(attention_module, "edit_projection", recording)
    return records


def test_without_a_call_the_unet_is_bit_identical(base):
    latents, timesteps = _unet_inputs()
    _, encodings = _encode(base, "a photo of a dog")
    with torch.no_grad():
        before = base.unet(latents, timesteps, encodings).sample
        install_processors(base.unet)
        after = base.unet(latents, timesteps, encodings).sample
    assert torch.equal(before, after)


def test_keys_at_the_concept_token_are_the_locked_superclass_keys_up_to_the_gate(base, covariance, recorded):
    """e = i* at the concept token: K = gate(1) W_K i_super and V = gate(1) o*_V in every layer."""
    concept = initial_concept(base, "<c-1>", "mug")
    add_concept_token(base.tokenizer, base.text_encoder, "<c-1>", concept.embedding)
    ids, encodings = _encode(base, "a photo of <c-1> on the beach")
    position = ids[0].tolist().index(base.tokenizer.convert_tokens_to_ids("<c-1>"))
    concept = dataclasses.replace(
        concept,
        target_input=encodings[0, position].clone(),
        value_targets={n: torch.randn_like(v) for n, v in concept.value_targets.items()},  # "learned"
    )
    install_processors(base.unet)
    call = PerfusionCall.build([[concept]], covariance)
    latents, timesteps = _unet_inputs()
    with torch.no_grad():
        base.unet(latents, timesteps, encodings, cross_attention_kwargs={"perfusion": call})
    open_gate = gate(torch.tensor(1.0), concept.beta, concept.tau).item()
    for name, layer in base.cross_attention_layers().items():
        keys, values = recorded[id(layer.to_k.weight)], recorded[id(layer.to_v.weight)]
        locked = layer.to_k.weight @ concept.superclass_input
        torch.testing.assert_close(keys[0, position], open_gate * locked, atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(values[0, position], open_gate * concept.value_targets[name], atol=1e-4, rtol=1e-4)


def test_the_concept_token_gets_the_same_outputs_at_any_position(base, covariance, recorded):
    concept = initial_concept(base, "<c-1>", "mug")
    concept.value_targets = {n: torch.randn_like(v) for n, v in concept.value_targets.items()}
    for value in concept.value_targets.values():
        assert value.ndim == 1  # one vector per layer: no (77, out) per-position table
    add_concept_token(base.tokenizer, base.text_encoder, "<c-1>", concept.embedding)
    _, encodings = _encode(base, "a photo of <c-1>")
    same = encodings.clone()
    same[0, 9] = encodings[0, 4]  # the concept's encoding placed again at another position
    install_processors(base.unet)
    call = PerfusionCall.build([[concept]], covariance)
    latents, timesteps = _unet_inputs()
    with torch.no_grad():
        base.unet(latents, timesteps, same, cross_attention_kwargs={"perfusion": call})
    for layer in base.cross_attention_layers().values():
        for weight in (layer.to_k.weight, layer.to_v.weight):
            torch.testing.assert_close(recorded[id(weight)][0, 9], recorded[id(weight)][0, 4])


def test_similarity_is_calibrated_by_the_covariance_and_the_gate_opens_at_the_concept(base, covariance, trained_pair):
    """Over the tokens C was estimated from, mean s(e)^2 = i*^T C^-1 C C^-1 i* / energy^2 = 1 / energy
    (an identity: it fails if C counted padding, was centered, or was inverted wrongly)."""
    from perfusion.corpus import builtin_prompts

    mug = trained_pair[0]
    batch = base.tokenizer(builtin_prompts(), padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        tokens = base.text_encoder(batch.input_ids)[0][batch.attention_mask.bool()].double()  # (n, d)
    i_star = mug.target_input.double()
    energy = (i_star @ covariance.c_inv @ i_star).item()
    mean_square = (similarity(tokens, i_star, covariance.c_inv) ** 2).mean().item()
    assert mean_square == pytest.approx(1 / energy, rel=0.02)
    add_concept_token(base.tokenizer, base.text_encoder, "<mug-1>", mug.embedding)
    concept_ids, concept_encodings = _encode(base, "a photo of <mug-1>")
    position = concept_ids[0].tolist().index(base.tokenizer.convert_tokens_to_ids("<mug-1>"))
    at_concept = similarity(concept_encodings[0, position].double(), i_star, covariance.c_inv)
    assert gate(at_concept, mug.beta, mug.tau).item() > 0.5


def test_global_locking_equals_local_when_the_concept_word_encodes_like_its_superclass(base, covariance):
    """Global locking's K path reads the superclass prompt. With the concept embedding equal to the
    (single-token) superclass embedding, both prompts encode identically, so global == local exactly;
    with any other embedding they differ."""
    concept = initial_concept(base, "<c-1>", "mug")
    renderer = ConceptRenderer(base, covariance)
    renderer.attach(concept)
    request = [RenderRequest("a photo of <c-1> on the beach", seed=5)]
    local_lock, global_lock = RenderSettings(steps=4, lock="local"), RenderSettings(steps=4, lock="global")
    local = renderer.render_arrays(request, local_lock)
    global_ = renderer.render_arrays(request, global_lock)
    assert abs(local - global_).max() < 1e-6
    renderer.attach(
        dataclasses.replace(concept, embedding=concept.embedding + 0.5 * torch.randn_like(concept.embedding))
    )
    local = renderer.render_arrays(request, local_lock)
    global_ = renderer.render_arrays(request, global_lock)
    assert abs(local - global_).max() > 1e-3


def test_a_call_for_another_batch_size_is_a_clear_error(base, covariance):
    concept = initial_concept(base, "<c-1>", "mug")
    install_processors(base.unet)
    call = PerfusionCall.build([[concept]], covariance)  # one row
    latents, timesteps = _unet_inputs(batch=2)
    _, encodings = _encode(base, "a photo of a dog")
    with pytest.raises(RenderError, match="describes 1 rows but the UNet batch has 2"):
        base.unet(latents, timesteps, encodings.expand(2, -1, -1), cross_attention_kwargs={"perfusion": call})


def test_self_attention_accepts_the_call_without_warnings(base, covariance, caplog):
    concept = initial_concept(base, "<c-1>", "mug")
    install_processors(base.unet)
    call = PerfusionCall.build([[concept]], covariance)
    latents, timesteps = _unet_inputs()
    _, encodings = _encode(base, "a photo of a dog")
    with caplog.at_level(logging.WARNING), torch.no_grad():
        base.unet(latents, timesteps, encodings, cross_attention_kwargs={"perfusion": call})
    assert not [r for r in caplog.records if "are not expected" in r.getMessage()]
