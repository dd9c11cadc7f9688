"""choose_gate: the concept's inference gate picked by a scorer over a grid, stored in the concept file."""

from __future__ import annotations

import pytest

import perfusion
from perfusion.errors import TrainingError
from perfusion.selection import GATE_GRID, choose_gate


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
