"""Context stability: s(e) of eq. 3 at a word and elsewhere, on a tiny encoder and on one with no context."""

from __future__ import annotations

import pytest
import torch

import perfusion
from perfusion.covariance import Covariance, second_moment
from perfusion.stability import CONTEXTS, context_stability, word_position


def _covariance(encode, tokenizer) -> Covariance:  # type: ignore[no-untyped-def]
    moment, count = second_moment(encode, tokenizer, perfusion.corpus.builtin_prompts(600))
    return Covariance.from_second_moment(moment, "test", count)


def test_an_encoder_without_context_keeps_every_word_exactly():
    """States that are the token embeddings themselves: the word scores s = 1 in every context."""
    base = perfusion.load_base("tiny")
    table = base.text_encoder.get_input_embeddings()

    def encode(ids: torch.Tensor) -> torch.Tensor:
        return table(ids)

    covariance = _covariance(encode, base.tokenizer)
    report = context_stability(encode, base.tokenizer, covariance.c_inv, "star", "circle")
    assert len(report.at_word) == len(CONTEXTS)
    assert report.at_word == pytest.approx([1.0] * len(CONTEXTS), abs=1e-9)
    # another occurrence of the same token elsewhere would also score 1; "star" is once per prompt
    assert max(report.elsewhere) < 0.999
    assert len(report.padding) == 4 * len(CONTEXTS)


def test_the_reference_prompt_itself_scores_one_on_a_real_encoder():
    base = perfusion.load_base("tiny")

    def encode(ids: torch.Tensor) -> torch.Tensor:
        return base.text_encoder(ids)[0]

    covariance = _covariance(encode, base.tokenizer)
    report = context_stability(encode, base.tokenizer, covariance.c_inv, "star", "circle", contexts=["a photo of a {}"])
    assert report.at_word == pytest.approx([1.0], abs=1e-6)  # same prompt as the reference: e = i_super
    summary = report.summary()
    assert set(summary) == {"at word p10", "at word median", "elsewhere p95", "elsewhere max", "padding p95"}


def test_word_position_finds_the_last_occurrence_of_a_phrase():
    assert word_position([5, 1, 2, 9, 1, 2, 7], [1, 2]) == 5
    assert word_position([5, 1, 2], [3]) is None
