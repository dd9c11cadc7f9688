"""The figures concept_quality.py reports: means over training seeds, table rows, CLIP's rank agreement with
the oracle, and the gate-sweep plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perfusion.toyworld.scoring import ATTRIBUTES, ConceptScore

TABLE_HEADER = [
    "| concept | variant | step | fidelity | alignment | in context | shape | color | texture | mark "
    "| CLIP-I | CLIP-T |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def mean_score(scores: list[ConceptScore]) -> ConceptScore:
    """Each figure averaged over the training seeds' scores."""
    return ConceptScore(
        fidelity=float(np.mean([x.fidelity for x in scores])),
        alignment=float(np.mean([x.alignment for x in scores])),
        rates={a: float(np.mean([x.rates[a] for x in scores])) for a in ATTRIBUTES},
        in_context=float(np.mean([x.in_context for x in scores])),
        clip_i=float(np.mean([x.clip_i for x in scores])),
        clip_t=float(np.mean([x.clip_t for x in scores])),
    )


def rank_agreement(pairs: list[tuple[float, float]]) -> float:
    """Spearman's rank correlation of (oracle figure, CLIP figure) pairs: how well CLIP ranks what the oracle
    ranks (ties get their mean rank)."""
    if len(pairs) < 3:
        return float("nan")

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values))
        for value in set(values):  # ties: their mean rank
            tied = np.array(values) == value
            out[tied] = out[tied].mean()
        return out

    first, second = ranks([a for a, _ in pairs]), ranks([b for _, b in pairs])
    if first.std() == 0 or second.std() == 0:
        return float("nan")
    return float(np.corrcoef(first, second)[0, 1])


def table_row(name: str, variant: str, steps: str, scores: list[ConceptScore], note: str) -> str:
    """One table row: the means over the training seeds, each seed's fidelity (and `note`) in brackets."""
    score = mean_score(scores)
    detail = "; ".join(
        x for x in (" / ".join(f"{x.fidelity:.0%}" for x in scores) if len(scores) > 1 else "", note) if x
    )
    return (
        f"| {name} | {variant} | {steps} | {score.fidelity:.0%}{f' ({detail})' if detail else ''} | "
        f"{score.alignment:.0%} | {score.in_context:.0%} | "
        + " | ".join(f"{score.rates[a]:.0%}" for a in ATTRIBUTES)
        + f" | {score.clip_i:.3f} | {score.clip_t:.3f} |"
    )


def plot_gate_sweep(points: list[tuple[float, float, float, float]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for offset, tau in enumerate(sorted({p[1] for p in points})):
        row = [p for p in points if p[1] == tau]
        (line,) = axes.plot([p[3] for p in row], [p[2] for p in row], marker="o", label=f"tau {tau}")
        # Betas that land on the same point share one label (a flat sweep would stack them unreadably);
        # each tau's labels sit at their own height so that curves on top of each other stay legible.
        labels: dict[tuple[float, float], list[str]] = {}
        for beta, _, fidelity, alignment in row:
            labels.setdefault((alignment, fidelity), []).append(f"{beta}")
        for (alignment, fidelity), betas in labels.items():
            axes.annotate(
                "/".join(betas),
                (alignment, fidelity),
                xytext=(4, 4 + 9 * offset),
                textcoords="offset points",
                fontsize=7,
                color=line.get_color(),
            )
    axes.margins(0.15)  # room for the labels above the highest point
    axes.set_xlabel("text alignment")
    axes.set_ylabel("fidelity")
    axes.set_title(f"{name}: inference-time sweep\n(labels: beta; one curve per tau)", fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
