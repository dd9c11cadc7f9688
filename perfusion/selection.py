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

The whole selection of a catalog concept (`training.select` in a manifest; config.SelectConfig):

    concept = train_selected(method, base, images, token, superclass, config, select, covariance=c)

trains on select.seeds seeds, each scored every config.select_every steps by `clip_scorer` (the paper's
measure: the harmonic mean of CLIP-I, renders of "a photo of <c>" against the training images, and CLIP-T,
new-context renders against their prompts with the token replaced by its superclass word), keeps the best
(seed, step), then sweeps its gate. metadata["selection"] records the choice and every score (no wall-clock time: the
same inputs give the same file; the index row has the attempt's time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from perfusion.clip_scoring import ClipScorer, superclass_prompt
from perfusion.concept import Concept
from perfusion.config import SelectConfig, TrainConfig
from perfusion.covariance import Covariance
from perfusion.errors import TrainingError
from perfusion.images import ImageInput, load_image
from perfusion.models import BaseModel
from perfusion.sampling import ConceptRenderer, RenderRequest, RenderSettings
from perfusion.tokens import temporary_concept_token
from perfusion.training import Scorer, StepInfo

# beta around the paper's 0.6-0.75 for local locking, tau around its 0.15; the concept's own gate is added.
GATE_GRID: tuple[tuple[float, float], ...] = tuple(
    (beta, tau) for beta in (0.55, 0.65, 0.7, 0.75, 0.85) for tau in (0.1, 0.15, 0.2)
)


# New contexts for CLIP-T: words every base here knows (the toy language is a subset of English).
SELECTION_CONTEXTS = (
    "{} on a white background",
    "a photo of {} next to a red circle",
    "{} on a black background",
    "{} on a yellow background",
)
FIDELITY_PROMPT = "a photo of {}"
VALIDATION_SEED = 5000  # selection's renders; benchmarks report on seeds below 2000
SELECTION_RENDER = RenderSettings(steps=25, guidance_scale=5.0)


def clip_scorer(
    base: BaseModel,
    covariance: Covariance,
    clip: ClipScorer,
    references: Sequence[ImageInput],
    superclass: str,
    samples: int = 8,
    log: Callable[[str], None] | None = None,
    render: RenderSettings = SELECTION_RENDER,
) -> Scorer:
    """A Scorer: the harmonic mean of CLIP-I and CLIP-T (each floored at 0) on `samples` fidelity and `samples`
    new-context renders (seeds VALIDATION_SEED..). Scoring a snapshot mid-training on the training's own base
    is safe: the snapshot's token vector is put back to the training's when the renders are done."""
    pictures = [_picture(image, base.resolution) for image in references]

    def score(snapshot: Concept, step: int) -> float:
        token = snapshot.token
        contexts = [SELECTION_CONTEXTS[k % len(SELECTION_CONTEXTS)].format(token) for k in range(samples)]
        requests = [RenderRequest(FIDELITY_PROMPT.format(token), seed=VALIDATION_SEED + k) for k in range(samples)]
        requests += [RenderRequest(c, seed=VALIDATION_SEED + 1000 + k) for k, c in enumerate(contexts)]
        with temporary_concept_token(base.tokenizer, base.text_encoder, token, snapshot.embedding.detach()):
            renderer = ConceptRenderer(base, covariance)
            renderer.attach(snapshot)
            images = list(renderer.render_arrays(requests, render))
        image_similarity = max(clip.image_similarity(images[:samples], pictures), 0.0)
        plain = [superclass_prompt(c, {token: superclass}) for c in contexts]
        text_similarity = max(clip.text_similarity(images[samples:], plain), 0.0)
        total = image_similarity + text_similarity
        harmonic = 2 * image_similarity * text_similarity / total if total else 0.0
        if log is not None:
            log(f"{token} step {step}: CLIP-I {image_similarity:.3f}, CLIP-T {text_similarity:.3f} -> {harmonic:.3f}")
        return harmonic

    return score


def load_scorer_clip(select: SelectConfig, base: BaseModel) -> ClipScorer:
    """The CLIP a selection scores with: the toy world's for 'toy' (the toy base only), else the folder's."""
    if select.scorer == "none":
        raise TrainingError("selection scorer 'none' scores nothing: leave training.select out instead")
    if select.scorer == "toy":
        if base.source != "toy":
            raise TrainingError(
                f"scorer 'toy' scores the toy base only, not {base.source!r}: use 'clip:<path to a local CLIP folder>'"
            )
        from perfusion.toyworld.clip import TOY_CLIP_DIR

        return ClipScorer.from_folder(TOY_CLIP_DIR, device=str(base.device))
    folder = select.clip_folder
    assert folder is not None  # SelectConfig checked the form
    # any CLIP scores images and captions: it need not be the text encoder the base was built on
    return ClipScorer.from_folder(Path(folder).expanduser(), device=str(base.device))


def train_selected(
    train: Callable[..., Concept],
    base: BaseModel,
    images: Sequence[ImageInput],
    token: str,
    superclass: str,
    config: TrainConfig,
    select: SelectConfig,
    *,
    masks: Sequence[ImageInput] | None = None,
    covariance: Covariance,
    on_step: Callable[[StepInfo], None] | None = None,
    log: Callable[[str], None] | None = None,
    grid: Sequence[tuple[float, float]] = GATE_GRID,
    render: RenderSettings = SELECTION_RENDER,
    scorer: Scorer | None = None,
) -> Concept:
    """Train on select.seeds seeds with step selection, keep the best (seed, step), then sweep its gate over
    `grid` (select.gate). `train` is a method's trainer (train_concept's signature, with `scorer`). `scorer`
    replaces select.scorer's CLIP score (a benchmark's: the toy world's oracle, which knows the product)."""
    if scorer is None:
        clip = load_scorer_clip(select, base)
        scorer = clip_scorer(base, covariance, clip, images, superclass, select.samples, log, render)
    candidates = []
    for offset in range(select.seeds):
        seeded = dataclasses.replace(config, seed=config.seed + offset)
        concept = train(
            base, images, token, superclass, seeded, masks=masks, covariance=covariance, scorer=scorer,
            on_step=None if on_step is None else _across_seeds(on_step, offset, select.seeds),
        )  # fmt: skip
        candidates.append((float(concept.metadata["selected_score"]), seeded.seed, concept))
    score, seed, best = max(candidates, key=lambda entry: entry[0])  # max keeps the first of equals
    if select.gate:
        best = choose_gate(best, scorer, grid)
        score = max(score, float(best.metadata["gate_selection"]["score"]))
    best.metadata["selection"] = {
        "scorer": select.scorer,
        "seeds": select.seeds,
        "samples": select.samples,
        "every": config.select_every,
        "seed": seed,
        "step": int(best.metadata["selected_step"]),
        "beta": best.beta,
        "tau": best.tau,
        "score": score,
        "seed_scores": [[s, value] for value, s, _ in candidates],
    }
    return best


def _across_seeds(on_step: Callable[[StepInfo], None], offset: int, seeds: int) -> Callable[[StepInfo], None]:
    """Progress over every seed's training as one count: seed k's step s is step k * steps + s."""

    def report(info: StepInfo) -> None:
        on_step(dataclasses.replace(info, step=offset * info.steps + info.step, steps=seeds * info.steps))

    return report


def _picture(image: ImageInput, resolution: int) -> np.ndarray:
    """A reference image as (h, w, 3) float in [0, 1], decoded as training decodes it."""
    pixels = load_image(image, resolution, "reference", 0)  # (3, h, w) in [-1, 1]
    return ((pixels.permute(1, 2, 0).float() + 1) / 2).clamp(0, 1).numpy()


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
