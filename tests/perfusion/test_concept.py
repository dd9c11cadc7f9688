"""Concept files: round trips, size, and a clear error for every kind of bad file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors

import perfusion
from perfusion.concept import FORMAT_VERSION
from perfusion.errors import ConceptFileError
from perfusion.models import build_tiny_pipeline, fingerprint

SETTINGS = perfusion.RenderSettings(steps=6)
REQUEST = [perfusion.RenderRequest("a photo of <mug-1> on the beach", seed=3)]


def _render(base, covariance, concept) -> np.ndarray:
    renderer = perfusion.ConceptRenderer(base, covariance)
    renderer.attach(concept)
    return renderer.render_arrays(REQUEST, SETTINGS)


def test_fp32_round_trip_is_exact(trained_pair, covariance, tmp_path):
    mug = trained_pair[0]
    path = tmp_path / "mug.safetensors"
    mug.save(path, dtype=torch.float32)
    loaded = perfusion.load_concept(path, perfusion.load_base("tiny"))
    assert torch.equal(loaded.embedding, mug.embedding) and torch.equal(loaded.target_input, mug.target_input)
    assert all(torch.equal(loaded.value_targets[n], mug.value_targets[n]) for n in mug.value_targets)
    assert (loaded.token, loaded.superclass, loaded.beta, loaded.tau) == (mug.token, mug.superclass, mug.beta, mug.tau)
    assert loaded.metadata == json.loads(json.dumps(mug.metadata))
    expected = _render(perfusion.load_base("tiny"), covariance, mug)
    assert np.array_equal(_render(perfusion.load_base("tiny"), covariance, loaded), expected)


def test_fp16_round_trip_is_within_the_stated_bound(trained_pair, covariance):
    """fp16 storage: renders within 1e-2 max / 2e-3 mean (abs, pixels in [0, 1]: under 3 and 1 8-bit levels)
    of the fp32 concept's. The gate is a steep sigmoid (tau 0.1-0.15), so a concept whose energy sits near
    its threshold amplifies fp16 rounding: with the embedding norm cap the tiny model's mug measured 6.4e-3 max
    and 1.1e-3 mean (4.5e-4 / 8.8e-5 uncapped, where its embedding grew to 4x the word's norm)."""
    mug = trained_pair[0]
    loaded = perfusion.load_concept(mug.to_bytes())  # fp16 is the default
    expected = _render(perfusion.load_base("tiny"), covariance, mug)
    difference = np.abs(_render(perfusion.load_base("tiny"), covariance, loaded) - expected)
    assert difference.max() < 1e-2 and difference.mean() < 2e-3, (difference.max(), difference.mean())


def test_the_file_holds_vectors_only(trained_pair):
    """No C^-1, no per-position tables, no copies: just the vectors PERFUSION.md lists."""
    mug = trained_pair[0]
    data = mug.to_bytes()
    half = 32 + sum(v.numel() for v in mug.value_targets.values())  # embedding, o*_V: fp16
    exact = 32 + 32  # i*, i_super: fp32 (the gate's inputs)
    header = struct.unpack("<Q", data[:8])[0]
    assert len(data) == 8 + header + 2 * half + 4 * exact  # the payload is exactly the vectors
    assert len(data) < 8_000


def test_the_gate_inputs_round_trip_exactly_in_a_half_precision_file(trained_pair):
    mug = trained_pair[0]
    loaded = perfusion.load_concept(mug.to_bytes())
    assert torch.equal(loaded.target_input, mug.target_input.float())
    assert torch.equal(loaded.superclass_input, mug.superclass_input.float())


def test_tensors_of_another_dtype_or_name_are_refused(trained_pair):
    mug = trained_pair[0]
    as_int8 = _corrupt(mug, tensors={"embedding": (mug.embedding * 100).to(torch.int8)})
    with pytest.raises(ConceptFileError, match="tensor embedding is int8; concept files hold float16"):
        perfusion.load_concept(as_int8)
    with pytest.raises(ConceptFileError, match="tensor target_input is bool"):
        perfusion.load_concept(_corrupt(mug, tensors={"target_input": mug.target_input > 0}))
    with pytest.raises(ConceptFileError, match=r"unknown tensor\(s\) \['backdoor'\]"):
        perfusion.load_concept(_corrupt(mug, tensors={"backdoor": torch.zeros(4)}))
    assert perfusion.load_concept(_corrupt(mug)).token == mug.token  # unsealed (an older file): still read


def test_a_damaged_or_cut_file_says_so(trained_pair):
    data = trained_pair[0].to_bytes()
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # one bit of o*_V: the file still parses
    with pytest.raises(ConceptFileError, match="fail the file's own checksum"):
        perfusion.load_concept_file(bytes(flipped))
    for cut in (data[:20], data[: len(data) // 2], data[:-10]):
        with pytest.raises(ConceptFileError, match=r"cut short|corrupt") as caught:
            perfusion.load_concept_file(cut)
        assert "pickle" not in str(caught.value)
    with pytest.raises(ConceptFileError, match="the file is empty"):
        perfusion.load_concept_file(b"")
    with pytest.raises(ConceptFileError, match="pickle formats are never loaded"):
        perfusion.load_concept_file(b"\x80\x04\x95" + bytes(40))


def _corrupt(mug: perfusion.Concept, *, tensors=None, metadata=None) -> bytes:
    """Rebuild a concept file with some tensors or metadata changed (unsealed, as another tool would write it)."""
    data = mug.to_bytes(torch.float32)
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    meta = {k: v for k, v in header["__metadata__"].items() if k != "payload_sha256"} | (metadata or {})
    loaded = perfusion.load_concept(data)
    current = {
        "embedding": loaded.embedding,
        "target_input": loaded.target_input,
        "superclass_input": loaded.superclass_input,
    }
    current |= {f"value_target/{n}": v for n, v in loaded.value_targets.items()}
    for key, value in (tensors or {}).items():
        if value is None:
            current.pop(key)
        else:
            current[key] = value
    return save_tensors({k: v.contiguous() for k, v in current.items()}, metadata=meta)


def test_a_concept_from_another_base_model_is_refused(trained_pair):
    other_pipeline = build_tiny_pipeline(seed=1)
    other = perfusion.BaseModel(other_pipeline, "tiny(seed=1)", fingerprint(other_pipeline))
    with pytest.raises(ConceptFileError, match=r"trained on base model .* but the loaded base model"):
        perfusion.load_concept(trained_pair[0].to_bytes(), other)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tensors": {"target_input": torch.zeros(31)}}, "target_input and superclass_input differ"),
        ({"tensors": {"embedding": torch.zeros(2, 16)}}, "expected a vector"),
        ({"tensors": {"target_input": None}}, r"missing tensor\(s\) \['target_input'\]"),
        ({"metadata": {"format_version": str(FORMAT_VERSION + 1)}}, "newer than this perfusion-batch reads"),
        ({"metadata": {"format": "something-else"}}, "not a Perfusion concept"),
        ({"metadata": {"layers": "not json"}}, "metadata field"),
        ({"tensors": {"embedding": torch.full((32,), float("nan"))}}, "NaN"),
        ({"metadata": {"token": "../../etc/passwd"}}, "not a valid concept token"),
    ],
)
def test_malformed_files_get_clear_errors(trained_pair, change, message):
    with pytest.raises(ConceptFileError, match=message):
        perfusion.load_concept(_corrupt(trained_pair[0], **change))


def test_shapes_that_do_not_fit_the_base_model_are_refused(trained_pair, base):
    mug = trained_pair[0]
    name = mug.layer_names[0]
    wrong = _corrupt(mug, tensors={f"value_target/{name}": torch.zeros(5)})
    with pytest.raises(ConceptFileError, match=f"value_target/{name} has shape \\(5,\\)"):
        perfusion.load_concept(wrong, base)


def test_a_token_that_collides_with_a_vocabulary_word_is_refused(trained_pair, base):
    with pytest.raises(ConceptFileError, match="collides with the existing vocabulary word 'mug'"):
        perfusion.load_concept(_corrupt(trained_pair[0], metadata={"token": "mug"}), base)


def test_files_that_are_not_concepts(tmp_path):
    with pytest.raises(ConceptFileError, match=r"not a safetensors concept file.*pickle formats are never loaded"):
        perfusion.load_concept(b"\x80\x04\x95pickle-ish bytes")
    with pytest.raises(ConceptFileError, match="cannot read the concept file"):
        perfusion.load_concept(tmp_path / "missing.safetensors")
    plain = save_tensors({"x": torch.zeros(3)})
    with pytest.raises(ConceptFileError, match="not a Perfusion concept"):
        perfusion.load_concept(plain)


def test_a_truncated_file_is_reported_as_corrupt(trained_pair):
    with pytest.raises(ConceptFileError, match=r"the file is cut short \(\d+ bytes of \d+\)"):
        perfusion.load_concept(trained_pair[0].to_bytes()[:-10])


def test_errors_survive_pickling_with_their_message():
    """Errors cross Ray process boundaries later: they must pickle with their message and type intact."""
    import pickle

    error = ConceptFileError("sku.safetensors: trained on another base model")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ConceptFileError and str(again) == str(error)
