"""The text-encoder covariance: what is counted, the inverse, and its file."""

from __future__ import annotations

import pytest
import torch

import perfusion
from perfusion.corpus import builtin_prompts, read_caption_file
from perfusion.covariance import Covariance
from perfusion.errors import CovarianceError

PROMPTS = ["a photo of a dog", "a red mug on a marble counter next to a teddy bear", "a cat"]


def test_second_moment_counts_real_tokens_through_eos_and_no_padding(base):
    covariance = perfusion.estimate_covariance(base, PROMPTS)  # 25 tokens < d: the ridge makes it invertible
    expected = torch.zeros(32, 32, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = base.tokenizer(prompt, return_tensors="pt").input_ids  # BOS .. EOS, unpadded
            encodings = base.text_encoder(ids)[0][0].double()  # causal: padding never changes these
            expected += encodings.T @ encodings
            count += ids.shape[1]
    assert covariance.token_count == count
    torch.testing.assert_close(covariance.second_moment, expected / count, atol=1e-6, rtol=1e-6)


def test_inverse_and_cholesky_are_consistent(covariance):
    c, c_inv, chol = covariance.second_moment, covariance.c_inv, covariance.cholesky
    assert c.dtype == c_inv.dtype == torch.float64
    torch.testing.assert_close(c, c.T)
    torch.testing.assert_close(chol @ chol.T, c_inv, atol=1e-8 * c_inv.abs().max().item(), rtol=1e-8)
    identity = torch.eye(c.shape[0], dtype=torch.float64)
    torch.testing.assert_close(c_inv @ c, identity, atol=1e-2, rtol=0)  # the 1e-6 ridge bounds the error
    assert covariance.condition_number() > 1


def test_builtin_corpus_is_large_deterministic_and_covers_the_vocabulary():
    prompts = builtin_prompts()
    assert len(prompts) >= 5000 and prompts == builtin_prompts()
    assert len(set(prompts)) > 3000
    text = " ".join(prompts)
    assert all(word in text for word in ("teddy bear", "backpack", "checkered", "marble counter"))


def test_caption_file(tmp_path, base):
    path = tmp_path / "captions.txt"
    path.write_text("# my captions\na photo of a dog\n\na cat on grass\n")
    assert read_caption_file(str(path)) == ["a photo of a dog", "a cat on grass"]
    assert (
        perfusion.estimate_covariance(base, read_caption_file(str(path))).token_count == 7 + 6
    )  # BOS a photo of a dog EOS; BOS a cat on grass EOS


def test_save_load_round_trip_and_fingerprint_check(covariance, tmp_path):
    path = tmp_path / "c.safetensors"
    perfusion.save_covariance(covariance, path)
    loaded = perfusion.load_covariance(path, expected_fingerprint=covariance.fingerprint)
    assert torch.equal(loaded.second_moment, covariance.second_moment)
    torch.testing.assert_close(loaded.c_inv, covariance.c_inv)
    assert loaded.token_count == covariance.token_count
    with pytest.raises(CovarianceError, match="belongs to base model"):
        perfusion.load_covariance(path, expected_fingerprint="0" * 32)


def test_unreadable_covariance_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"0123456789abcdef")
    with pytest.raises(CovarianceError, match="not a readable covariance"):
        perfusion.load_covariance(garbage)
    with pytest.raises(CovarianceError, match="no prompts"):
        perfusion.estimate_covariance(perfusion.load_base("tiny"), [])


def test_singular_second_moment_is_reported():
    with pytest.raises(CovarianceError, match="not positive definite"):
        Covariance.from_second_moment(-torch.eye(4, dtype=torch.float64), "f", 10, ridge=0.0)


def test_cached_covariance_is_keyed_by_fingerprint(base, tmp_path, monkeypatch):
    first = perfusion.cached_covariance(base, tmp_path, ["a photo of a dog", "a cat"] * 20)
    assert [p.name for p in tmp_path.iterdir()] == [f"{base.fingerprint}.safetensors"]

    def must_not_estimate(*args, **kwargs):
        raise AssertionError("estimated again")

    monkeypatch.setattr(perfusion.covariance, "estimate_covariance", must_not_estimate)
    again = perfusion.cached_covariance(base, tmp_path)
    assert torch.equal(again.second_moment, first.second_moment)
