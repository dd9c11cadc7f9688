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
    original = attention_module.apply_edit

    def recording(call, layer_name, path, encodings, projected, weight, targets, position_mask):
        out = original(call, layer_name, path, encodings, projected, weight, targets, position_mask)
        records[id(weight)] = out.detach().clone()
        return out

    monkeypatch.setattr(attention_module, "apply_edit", recording)
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


def test_the_fused_cached_edit_equals_the_reference_equation(covariance):
    """apply_edit (one batched product, mix and matrix cached on the call) computes rank1.edit_projection's
    h = W e_perp + sum_k gate_k o*_k, with and without gradients, for rows with 0, 1 and 2 concepts; an
    in-place change of the encodings is not served from the cache."""
    from perfusion.rank1 import edit_projection

    d, out, m = covariance.c_inv.shape[0], 24, 7
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(d, generator=generator) for _ in range(2)]
    rows = [[], [(inputs[0], 0.6, 0.1)], [(inputs[0], 0.6, 0.1), (inputs[1], 0.7, 0.15)]]
    fake = [dataclasses.replace(initial_concept_stub(d), target_input=i, beta=b, tau=t) for i, b, t in rows[2]]
    call = PerfusionCall.build([[], fake[:1], fake], covariance)
    weight = torch.randn(out, d, generator=generator)
    targets = torch.randn(3, 2, out, generator=generator)
    encodings = torch.randn(3, m, d, generator=generator)
    encodings[1, 2] = inputs[0]  # the gate opens here
    encodings[2, 4] = inputs[1]
    reference = edit_projection(encodings, encodings @ weight.T, weight, call.basis, targets)
    with torch.no_grad():
        first = attention_module.apply_edit(
            call, "layer", "v", encodings, encodings @ weight.T, weight, lambda: targets
        )
        again = attention_module.apply_edit(
            call, "layer", "v", encodings, encodings @ weight.T, weight, lambda: targets
        )
    assert torch.allclose(first, reference, atol=1e-4) and torch.equal(first, again)
    assert len(call._mixes) == 1 and len(call._matrices) == 1  # the second call was served from the cache
    assert torch.allclose(first[0], encodings[0] @ weight.T, atol=1e-5)  # a row without concepts is untouched
    with torch.no_grad():
        encodings[1, 2] = 0.0  # in place: the cached mix no longer describes these encodings
        changed = attention_module.apply_edit(
            call, "layer", "v", encodings, encodings @ weight.T, weight, lambda: targets
        )
    assert torch.allclose(
        changed, edit_projection(encodings, encodings @ weight.T, weight, call.basis, targets), atol=1e-4
    )
    learned = targets.clone().requires_grad_(True)
    trained = attention_module.apply_edit(call, "x", "v", encodings, encodings @ weight.T, weight, lambda: learned)
    trained.sum().backward()
    assert learned.grad is not None and learned.grad[2].abs().sum() > 0


def initial_concept_stub(d: int):  # type: ignore[no-untyped-def]
    """A concept with edits whose only role here is its target input, beta and tau."""
    from perfusion.concept import Concept

    return Concept(
        token="<stub>",
        superclass="mug",
        embedding=torch.zeros(d),
        target_input=torch.zeros(d),
        superclass_input=torch.zeros(d),
        value_targets={"layer": torch.zeros(4)},
        fingerprint="stub",
    )
