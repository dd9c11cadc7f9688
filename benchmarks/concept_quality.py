"""The paper's claims in the toy world, scored by the oracle.

    python -m benchmarks.concept_quality [--steps 400] [--images 6] [--samples 16] [--quick] [--device cuda]
    python -m benchmarks.concept_quality --train-seeds 3        # the README's table (~50 min on 2 cores)
    python -m benchmarks.concept_quality --steps 800 --masks    # the earlier masked table (27 min, one seed)
    python -m benchmarks.concept_quality --steps 800 --average-tail 0.5 --train-seeds 3   # 56 min, not adopted
    python -m benchmarks.concept_quality --select-every 50 --select-samples 32 --train-seeds 3 \\
        --variants untrained,perfusion --table-only               # step selection, 48 min, not adopted
    python -m benchmarks.concept_quality --train-seeds 3 --best-of 3 --variants untrained,perfusion \\
        --table-only                                              # seed selection (best of 3 on validation)
    python -m benchmarks.concept_quality --variants untrained,perfusion,"trained keys"

Per personal concept, from a few training images:
- fidelity: fraction of renders of "a photo of <concept>" in which the oracle finds the concept
  (its shape, color, texture and mark), with each attribute's own rate beside it;
- text alignment: fraction of renders of new-context prompts (a new background; a second object) in which
  the oracle finds what the prompt asked for (the background; the second object's shape and color), and
  "in context": how often the whole product is found in those renders (alignment does not ask for it);
- variants: Perfusion (key-locked) vs the same training with trained keys vs textual inversion alone, and two
  baselines: the untrained concept (step 0: the superclass's embedding, no edit) and no concept at all, the
  base prompted with the product's description ("a dotted purple star with a dot"; that combination of
  shape, color and mark was never in pretraining);
- the inference-time beta/tau trade-off for one concept, no retraining (the Pareto front), as a PNG;
- two concepts in one prompt (both present, background right); 1-shot vs few-shot.
Target: Perfusion fidelity >= 70% and alignment >= 70% on at least 3 of 4 concepts.
Writes benchmarks/results/concept_quality.md and concept_pareto.png (with --masks: *_masked.md / .png).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import perfusion
from benchmarks.flags import option, parse_flags
from benchmarks.quality_report import TABLE_HEADER, mean_score, plot_gate_sweep, rank_agreement, table_row
from perfusion.clip_scoring import ClipFolderError, ClipScorer, check_clip_folder
from perfusion.toyworld.clip import TOY_CLIP_DIR
from perfusion.toyworld.oracle import has_concept, read_batch
from perfusion.toyworld.scoring import RENDER, ConceptScore, oracle_scorer, score_concept
from perfusion.toyworld.world import PERSONAL_CONCEPTS, PersonalConcept, concept_images, concept_masks
from perfusion.training import Scorer, initial_concept

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 8  # images per optimizer step in every table so far (the paper: 16; `--batch-size`)
VARIANTS: dict[str, dict[str, Any]] = {
    "untrained": {},  # the concept before step 1
    "described in words": {},  # no concept: the base prompted with the product's description
    "perfusion": {},
    "trained keys": {"lock_keys": False},
    "textual inversion": {"method": "textual_inversion"},
    # Personalized Residuals (RESIDUALS.md), their own recipe (--residual-*); one training serves both rows
    "residuals": {"method": "residuals"},
    "residuals LAG off": {"method": "residuals", "localized": False},
}
DEFAULT_VARIANTS = "untrained,described in words,perfusion,trained keys,textual inversion"


@dataclass(frozen=True)
class QualityConfig:
    """One run of the benchmark; each field is a flag (--steps, --batch-size, ...)."""

    steps: int = option(400)
    images: int = option(6)
    batch_size: int = option(BATCH, "images per optimizer step (TrainConfig.batch_size)")
    samples: int = option(16, "renders per measure")
    quick: bool = option(False, "one concept, Perfusion only (smoke run)")
    masks: bool = option(False, "train with the products' masks (paper sec. 4.4)")
    mask_background: float = option(0.25, "the masks' value off the product (0: cut-outs)")
    select_every: int = option(
        0, "score every N steps on validation seeds and keep the best step (paper sec. 4.4); 0: the last step"
    )
    select_samples: int = option(32, "validation renders per measure at each scored step")
    lr_value: float = option(perfusion.TrainConfig().lr_value, "TrainConfig.lr_value (o*_V's rate)")
    lr_schedule: str = option("constant", "TrainConfig.lr_schedule: constant or cosine")
    average_tail: float = option(0.0, "TrainConfig.average_tail: save the mean over this last fraction of steps")
    render_seed: int = option(0, "first seed of the reported renders (another draw: 2000; validation: 5000..)")
    train_seeds: int = option(
        1, "train each variant this many times (TrainConfig.seed 0..N-1) and report the means, each seed's beside"
    )
    best_of: int = option(
        1, "train N candidates per reported seed and keep the best on validation renders (selection across runs)"
    )
    templates: str | None = option(None, "training prompts, '|'-separated, each with {} (default: the base's own)")
    table_only: bool = option(False, "the table alone: no gate sweep, pair or one-shot")
    variants: str = option(DEFAULT_VARIANTS, f"comma-separated, from: {', '.join(VARIANTS)}")
    residual_steps: int = option(150, "residual variants: training steps (the paper: 150)")
    residual_batch: int = option(4, "residual variants: images per step (the paper: 4)")
    residual_lr: float = option(1e-3, "residual variants: TrainConfig.lr_residual (the paper: 1e-3)")
    clip: str = option(str(TOY_CLIP_DIR), "a local CLIP folder for CLIP-I / CLIP-T beside the oracle; 'none' to skip")
    device: str = option("cpu", "cpu or cuda (quality figures do not depend on it)")
    out: Path = field(default=RESULTS, metadata={"help": "folder for the table and the plot"})

    @property
    def chosen(self) -> list[str]:
        return ["untrained", "perfusion"] if self.quick else self.variants.split(",")

    @property
    def prompt_templates(self) -> tuple[str, ...] | None:
        return tuple(self.templates.split("|")) if self.templates else None

    def recipe(self) -> dict[str, Any]:
        """The training recipe every trained variant and the one-shot concept share (TrainConfig fields)."""
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "flip_probability": 0.0,
            "lr_schedule": self.lr_schedule,
            "lr_value": self.lr_value,
            "average_tail": self.average_tail,
            "templates": self.prompt_templates,
        }

    def problems(self) -> list[str]:
        """Every flag that cannot work, checked before the base model loads."""
        found = []
        unknown = [v for v in self.chosen if v not in VARIANTS]
        if unknown:
            found.append(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        if "perfusion" not in self.chosen and not self.table_only:
            found.append("--variants: the gate sweep, the pair and the one-shot need perfusion; add it or --table-only")
        for name in ("select_samples", "train_seeds", "best_of"):
            if getattr(self, name) < 1:
                found.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        templates = self.prompt_templates
        if templates is not None and any("{}" not in t for t in templates):
            found.append(f"--templates: each '|'-separated prompt needs a {{}} for the concept (got {list(templates)})")
        try:
            perfusion.TrainConfig(**self.recipe(), select_every=self.select_every or self.steps)
        except perfusion.TrainingError as error:
            found.append(str(error))
        if self.clip != "none":
            try:  # config class, weights, text width
                check_clip_folder(self.clip)
            except ClipFolderError as error:
                found.append(f"--clip: {error}")
        return found

    def describe(self) -> str:
        """The recipe in words, for the table's title."""
        if not set(self.chosen) - {"untrained", "described in words"}:
            return "baselines only, nothing trained"
        parts = [f"{self.images} images, {self.steps} steps"]
        if self.select_every:
            parts.append(f"step selected every {self.select_every} on {self.select_samples} validation renders")
        parts += ["cosine learning rate"] if self.lr_schedule == "cosine" else []
        parts += [f"mean of the last {self.average_tail:.0%} of the steps saved"] if self.average_tail else []
        parts += [f"batch {self.batch_size}"] if self.batch_size != BATCH else []
        parts += [f"o*_V rate {self.lr_value}"] if self.lr_value != perfusion.TrainConfig().lr_value else []
        parts += [f"reported on seeds from {self.render_seed}"] if self.render_seed else []
        parts += [f"mean of {self.train_seeds} training seeds"] if self.train_seeds > 1 else []
        if self.best_of > 1:
            parts.append(f"each the best of {self.best_of} on {self.select_samples} validation renders a measure")
        parts += [f"templates {list(self.prompt_templates or ())}"] if self.templates else []
        parts += [f"masks (background {self.mask_background})"] if self.masks else []
        parts.append(f"embedding norm cap {perfusion.TrainConfig().embedding_norm_cap}")
        if any(VARIANTS[v].get("method") == "residuals" for v in self.chosen):
            parts.append(
                f"residuals: {self.residual_steps} steps, batch {self.residual_batch}, lr {self.residual_lr}, rank "
                f"{perfusion.TrainConfig().residual_rank} x channels"
            )
        return ", ".join(parts)


def parse_config(argv: list[str] | None = None) -> QualityConfig:
    """The flags of QualityConfig's fields; any problem is an argparse error before anything loads."""
    return parse_flags(QualityConfig, (__doc__ or "").splitlines()[0], argv)


class QualityRun:
    """The benchmark's parts over one base model and its C^-1: the table, the gate sweep, the pair, one-shot."""

    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self.base = self.fresh_base()
        self.clip = ClipScorer.from_folder(config.clip, device=config.device) if config.clip != "none" else None
        self.covariance = perfusion.estimate_covariance(self.base)  # from the base's own captions
        self.concepts = PERSONAL_CONCEPTS[:1] if config.quick else PERSONAL_CONCEPTS
        self.trained: dict[tuple[str, str], perfusion.Concept] = {}  # (concept, variant) -> first seed's concept
        self.fidelities: dict[str, float] = {}  # Perfusion's, per concept: the sweep and the pair use the best
        self.residuals: dict[tuple[str, int], Any] = {}  # (concept, seed) -> residual concept, both LAG rows

    def fresh_base(self) -> perfusion.BaseModel:
        """A fresh copy of the toy base: renderers add concept tokens to theirs."""
        return perfusion.load_base("toy", device=self.config.device)

    def renderer(self, *concepts: perfusion.Concept) -> perfusion.ConceptRenderer:
        renderer = perfusion.ConceptRenderer(self.fresh_base(), self.covariance)
        for concept in concepts:
            renderer.attach(concept)
        return renderer

    def train(
        self,
        spec: PersonalConcept,
        images: list[Any],
        masks: list[Any] | None,
        seed: int,
        overrides: dict[str, Any],
        scorer: Scorer | None,
    ) -> perfusion.Concept:
        """One training of the shared recipe (step selection with `scorer` when --select-every is set); the
        residual variants train on their own recipe, once per concept and seed."""
        if overrides.get("method") == "residuals":
            key = (spec.name, seed)
            if key not in self.residuals:
                recipe = perfusion.TrainConfig.for_method(
                    method="residuals",
                    steps=self.config.residual_steps,
                    batch_size=self.config.residual_batch,
                    lr_residual=self.config.residual_lr,
                    flip_probability=0.0,
                    templates=self.config.prompt_templates,
                    seed=seed,
                )
                self.residuals[key] = perfusion.methods.method_named("residuals").train(
                    self.base, images, f"<{spec.name}>", spec.superclass, recipe, masks=masks
                )
            return self.residuals[key]
        every = self.config.select_every
        config = perfusion.TrainConfig(
            **self.config.recipe(), select_every=every or self.config.steps, seed=seed, **overrides
        )
        return perfusion.train_concept(
            self.base,
            images,
            f"<{spec.name}>",  # the token every variant of the table renders
            spec.superclass,
            config,
            covariance=self.covariance,
            masks=masks,
            scorer=scorer if every else None,
        )

    def table(self) -> list[str]:
        """One row per concept and variant, and CLIP's rank agreement with the oracle over the rows."""
        config = self.config
        lines = [
            f"# Concept quality on toy {self.base.fingerprint[:12]} ({config.describe()}, {config.samples} samples)",
            "",
            *TABLE_HEADER,
        ]
        agreement: list[ConceptScore] = []  # every row's mean score
        for spec in self.concepts:
            images = concept_images(spec, config.images, seed=11)
            masks = (
                concept_masks(spec, config.images, seed=11, background=config.mask_background) if config.masks else None
            )
            # the oracle on validation renders (seeds 5000..), for step selection and for --best-of
            scorer = oracle_scorer(self.fresh_base, self.covariance, spec, samples=config.select_samples, log=print)
            for variant in config.chosen:
                scores, steps, note = self.variant_scores(spec, variant, images, masks, scorer)
                if variant == "perfusion":
                    self.fidelities[spec.name] = mean_score(scores).fidelity
                agreement.append(mean_score(scores))
                lines.append(table_row(spec.name, variant, steps, scores, note))
                print(lines[-1], flush=True)
        if self.clip is not None:
            lines += [
                "",
                f"CLIP ({config.clip}) against the oracle over the {len(agreement)} rows above, Spearman rank "
                f"correlation: CLIP-I vs fidelity {rank_agreement([(x.fidelity, x.clip_i) for x in agreement]):.2f}, "
                f"CLIP-T vs alignment {rank_agreement([(x.alignment, x.clip_t) for x in agreement]):.2f}",
            ]
            print(lines[-1])
        return lines

    def variant_scores(
        self, spec: PersonalConcept, variant: str, images: list[Any], masks: list[Any] | None, scorer: Scorer
    ) -> tuple[list[ConceptScore], str, str]:
        """(one score per training seed, the selected steps, a note) for one table row."""
        config, token = self.config, f"<{spec.name}>"
        references = [np.asarray(image) for image in images]

        settings = dataclasses.replace(RENDER, localized=VARIANTS[variant].get("localized", True))

        def score(renderer: perfusion.ConceptRenderer, prompt: str) -> ConceptScore:
            return score_concept(
                renderer,
                spec,
                prompt,
                config.samples,
                seed=config.render_seed,
                clip=self.clip,
                references=references,
                settings=settings,
            )

        if variant == "described in words":  # nothing to train: the base model alone
            return [score(self.renderer(), spec.description())], "-", ""
        scores, steps, picked = [], [], []
        for group in range(1 if variant == "untrained" else config.train_seeds):
            if variant == "untrained":
                concept = initial_concept(
                    self.base, token, spec.superclass, perfusion.TrainConfig(templates=config.prompt_templates)
                )
            else:
                seeds = range(group * config.best_of, (group + 1) * config.best_of)  # --best-of 1: seed = group
                overrides = {k: v for k, v in VARIANTS[variant].items() if k != "localized"}  # a render setting
                candidates = [(s, self.train(spec, images, masks, s, overrides, scorer)) for s in seeds]
                seed, concept = (
                    pick_best(candidates, scorer, f"{spec.name} {variant}") if len(seeds) > 1 else candidates[0]
                )
                picked.append(seed)
            self.trained.setdefault((spec.name, variant), concept)  # the first group's: the sweep and pair use it
            scores.append(score(self.renderer(concept), token))
            steps.append(str(concept.metadata.get("selected_step", 0)))
        note = f"seeds {', '.join(map(str, picked))}" if config.best_of > 1 and picked else ""
        return scores, " / ".join(dict.fromkeys(steps)), note

    def ranked(self) -> list[PersonalConcept]:
        """The concepts by Perfusion's fidelity, best first: a sweep over a concept never found shows noise."""
        return sorted(self.concepts, key=lambda c: -self.fidelities[c.name])

    def gate_sweep(self, plot: Path) -> list[str]:
        """The inference-time trade-off: the best-learned concept, gates swept, no retraining (a Pareto front)."""
        config, spec = self.config, self.ranked()[0]
        token = f"<{spec.name}>"
        renderer = self.renderer(self.trained[(spec.name, "perfusion")])
        points = []
        for tau in (0.1, 0.15, 0.2):
            for beta in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
                gate = {token: (beta, tau)}
                swept = score_concept(renderer, spec, token, config.samples // 2, gates=gate, seed=config.render_seed)
                points.append((beta, tau, swept.fidelity, swept.alignment))
                print(
                    f"pareto beta {beta} tau {tau}: fidelity {swept.fidelity:.0%} alignment {swept.alignment:.0%}",
                    flush=True,
                )
        plot_gate_sweep(points, plot, spec.name)
        lines = [
            "",
            f"## Inference-time gate sweep ({spec.name})",
            "",
            "| beta | tau | fidelity | alignment |",
            "| --- | --- | --- | --- |",
        ]
        return lines + [f"| {b} | {t} | {f:.0%} | {a:.0%} |" for b, t, f, a in points]

    def pair_and_one_shot(self) -> list[str]:
        """Two concepts in one prompt; one training image instead of a few."""
        config = self.config
        first, second = self.ranked()[:2]
        pair = self.renderer(self.trained[(first.name, "perfusion")], self.trained[(second.name, "perfusion")])
        prompt = f"<{first.name}> and <{second.name}> on a white background"
        requests = [perfusion.RenderRequest(prompt, seed=config.render_seed + s) for s in range(config.samples)]
        readings = read_batch(list(pair.render_arrays(requests, RENDER)))
        found = {c.name: np.mean([has_concept(r, c) for r in readings]) for c in (first, second)}
        white = np.mean([r.background == "white" for r in readings])
        both = np.mean([has_concept(r, first) and has_concept(r, second) and r.background == "white" for r in readings])
        one_shot = perfusion.train_concept(
            self.base,
            concept_images(first, 1, seed=11),
            f"<{first.name}>",
            first.superclass,
            perfusion.TrainConfig(**config.recipe()),
            covariance=self.covariance,
            masks=concept_masks(first, 1, seed=11, background=config.mask_background) if config.masks else None,
        )
        shot = score_concept(self.renderer(one_shot), first, f"<{first.name}>", config.samples, seed=config.render_seed)
        return [
            "",
            f"Two concepts in one prompt ({prompt}): both present and background right {both:.0%} ({first.name} "
            f"found {found[first.name]:.0%}, {second.name} {found[second.name]:.0%}, background {white:.0%})",
            f"One-shot {first.name} (last step, no selection): fidelity {shot.fidelity:.0%}, "
            f"alignment {shot.alignment:.0%}",
        ]


def run(config: QualityConfig) -> Path:
    """The whole benchmark; returns the table it wrote (results/concept_quality[_masked].md)."""
    suffix = "_masked" if config.masks else ""  # both recipes' results kept side by side
    table, plot = config.out / f"concept_quality{suffix}.md", config.out / f"concept_pareto{suffix}.png"
    quality = QualityRun(config)
    lines = quality.table()
    config.out.mkdir(parents=True, exist_ok=True)
    if not config.table_only:
        lines += quality.gate_sweep(plot)
        if not config.quick:
            lines += quality.pair_and_one_shot()
            print("\n".join(lines[-2:]))
    table.write_text("\n".join(lines) + "\n")
    print(f"wrote {table}" + ("" if config.table_only else f" and {plot}"))
    return table


def pick_best(
    candidates: list[tuple[int, perfusion.Concept]], scorer: Scorer, label: str
) -> tuple[int, perfusion.Concept]:
    """(seed, concept) of the candidate with the best validation score (the first of equals). The scorer renders
    validation seeds only, so the choice never sees the renders the table reports."""
    scored = []
    for seed, concept in candidates:
        value = scorer(concept, int(concept.metadata["selected_step"]))
        print(f"{label} seed {seed}: validation score {value:.2f}", flush=True)
        scored.append((value, seed, concept))
    _, seed, concept = max(scored, key=lambda c: c[0])
    return seed, concept


if __name__ == "__main__":
    run(parse_config())
