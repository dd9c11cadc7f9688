"""What choosing a concept's operating point costs and buys (paper sec. 4.4; perfusion/selection.py).

    python -m benchmarks.selection                                   # dotted-star, ~15 minutes on 2 cores
    python -m benchmarks.selection --products dotted-star,striped-square --every 50 --samples 8
    python -m benchmarks.selection --products dotted-star,striped-square --scorer oracle \
        --out benchmarks/results/selection_oracle.md                # selection with the oracle as scorer

Each product is trained twice on the toy base, from one recipe (the composition benchmark's: 6 images, 400
steps, batch 8, no flips): plain (the last step, the default gate), and with `training.select` as a catalog
would set it (scorer toy: the toy CLIP's harmonic mean of CLIP-I and CLIP-T, every --every steps on --samples
validation renders a measure, then the gate swept over GATE_GRID). Both are then judged by the oracle on the
reported seeds (16 "a photo of" renders and 16 new-context renders; never the selection's seeds): fidelity,
alignment, in context. Prints one row per product and training and the cost ratio of this run (selected
training seconds / plain training seconds); writes results/selection.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import perfusion
from benchmarks.flags import option, parse_flags
from perfusion.selection import train_selected
from perfusion.toyworld.scoring import oracle_scorer, score_concept
from perfusion.toyworld.world import PERSONAL_CONCEPTS, concept_images

RESULTS = Path(__file__).resolve().parent / "results"
KNOWN = {c.name: c for c in PERSONAL_CONCEPTS}


@dataclass(frozen=True)
class SelectionConfig:
    products: str = option("dotted-star", f"comma-separated, from: {', '.join(KNOWN)}")
    steps: int = option(400, "training steps")
    every: int = option(100, "score every N steps (training.select.every)")
    samples: int = option(4, "validation renders a measure at each score (training.select.samples)")
    seeds: int = option(1, "training seeds tried (training.select.seeds)")
    scorer: str = option("toy", "toy (the toy CLIP, as a catalog's `scorer: toy`) or oracle (knows the product)")
    report_samples: int = option(16, "oracle renders a measure for the reported figures")
    out: str = option(str(RESULTS / "selection.md"), "where the table goes")

    def problems(self) -> list[str]:
        unknown = [n for n in self.products.split(",") if n not in KNOWN]
        found = [f"--products: unknown {unknown}; use {', '.join(KNOWN)}"] if unknown else []
        if self.scorer not in {"toy", "oracle"}:
            found.append(f"--scorer must be toy or oracle, not {self.scorer!r}")
        if not 1 <= self.every <= self.steps:
            found.append(f"--every must be between 1 and --steps ({self.steps})")
        return found


def main(argv: list[str] | None = None) -> None:
    config = parse_flags(SelectionConfig, __doc__.splitlines()[0], argv)
    base = perfusion.load_base("toy")
    covariance = perfusion.estimate_covariance(base)
    recipe = perfusion.TrainConfig(steps=config.steps, batch_size=8, flip_probability=0.0, select_every=config.every)
    select = perfusion.SelectConfig(scorer="toy", seeds=config.seeds, samples=config.samples)
    rows, ratios = [], []
    for name in config.products.split(","):
        spec, token = KNOWN[name], f"<{name}>"
        images = concept_images(spec, 6, seed=11)
        started = time.perf_counter()
        plain = perfusion.train_concept(base, images, token, spec.superclass, recipe, covariance=covariance)
        plain_seconds = time.perf_counter() - started
        print(f"{name}: plain training {plain_seconds:.0f} s; selecting ...", flush=True)
        started = time.perf_counter()
        oracle = None
        if config.scorer == "oracle":
            oracle = oracle_scorer(lambda: perfusion.load_base("toy"), covariance, spec, config.samples, log=print)
        chosen = train_selected(
            perfusion.train_concept, base, images, token, spec.superclass, recipe, select,
            covariance=covariance, log=print, scorer=oracle,
        )  # fmt: skip
        selected_seconds = time.perf_counter() - started
        ratios.append(selected_seconds / plain_seconds)
        for label, concept, seconds in (("plain", plain, plain_seconds), ("selected", chosen, selected_seconds)):
            renderer = perfusion.ConceptRenderer(perfusion.load_base("toy"), covariance)
            renderer.attach(concept)
            score = score_concept(renderer, spec, token, config.report_samples)
            selection = concept.metadata.get("selection", {})
            rows.append(
                f"| {name} | {label} | {concept.metadata['selected_step']} | {concept.beta:g} / {concept.tau:g} | "
                f"{format(selection['score'], '.3f') if 'score' in selection else '-'} | {score.fidelity:.0%} | "
                f"{score.alignment:.0%} | "
                f"{score.in_context:.0%} | {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
    lines = [
        f"# Operating-point selection on toy {base.fingerprint[:12]} ({config.steps} steps, batch 8; scorer "
        f"{'the toy CLIP' if config.scorer == 'toy' else 'the oracle'} every {config.every} steps on "
        f"{config.samples} renders a measure, {config.seeds} seed(s), then the gate grid; oracle on "
        f"{config.report_samples} renders a measure)",
        "",
        "| product | training | step | beta / tau | selection score | fidelity | alignment | in context | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Cost, selected / plain training seconds in this run: " + ", ".join(f"{r:.1f}x" for r in ratios) + ".",
    ]
    Path(config.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]), f"\nwrote {config.out}")


if __name__ == "__main__":
    main()
