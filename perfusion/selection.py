"""A concept's inference gate chosen for it: the paper's sec. 4.4 operating point, by measurement.

    chosen = choose_gate(concept, scorer)          # every (beta, tau) of GATE_GRID, the best score kept
    chosen.beta, chosen.tau                        # the concept's default gate from now on (renders use it)
    chosen.metadata["gate_selection"]              # {"beta", "tau", "score", "scores": [[beta, tau, score], ...]}

The gate of eq. (3), sigmoid((s(e) - beta) / tau), decides how strongly an encoding is edited: a lower beta or
a wider tau lets more of the prompt through the edit (fidelity), a higher beta keeps more of the base
(alignment). The paper picks (beta, tau) per concept at inference, without retraining; `scorer` is whatever
measures a concept there (training.Scorer: higher is better; in the toy world the oracle's harmonic mean of
fidelity and alignment, toyworld.scoring.oracle_scorer). Ties keep the first grid point, so the search is
deterministic. The sweep renders len(grid) x the scorer's renders; the concept's tensors are untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from perfusion.concept import Concept
from perfusion.errors import TrainingError
from perfusion.training import Scorer

# beta around the paper's 0.6-0.75 for local locking, tau around its 0.15; the concept's own gate is added.
GATE_GRID: tuple[tuple[float, float], ...] = tuple(
    (beta, tau) for beta in (0.55, 0.65, 0.7, 0.75, 0.85) for tau in (0.1, 0.15, 0.2)
)


def choose_gate(concept: Concept, scorer: Scorer, grid: Sequence[tuple[float, float]] = GATE_GRID) -> Concept:
    """A copy of `concept` whose default gate is the grid point (or its own gate) that `scorer` rates best."""
    if not grid:
        raise TrainingError(f"concept {concept.token!r}: the gate grid is empty; give at least one (beta, tau)")
    for beta, tau in grid:
        if not tau > 0:
            raise TrainingError(f"concept {concept.token!r}: gate grid point ({beta}, {tau}) needs tau > 0")
    step = int(concept.metadata.get("selected_step", 0))
    candidates = [(concept.beta, concept.tau)] + [point for point in grid if point != (concept.beta, concept.tau)]
    scores = []
    for beta, tau in candidates:
        scores.append((beta, tau, float(scorer(dataclasses.replace(concept, beta=beta, tau=tau), step))))
    beta, tau, best = max(scores, key=lambda entry: entry[2])  # max keeps the first of equals
    metadata = concept.metadata | {
        "gate_selection": {"beta": beta, "tau": tau, "score": best, "scores": [list(s) for s in scores]}
    }
    return dataclasses.replace(concept, beta=beta, tau=tau, metadata=metadata)
