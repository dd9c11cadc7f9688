"""How well a toy concept was learned, read by the oracle: the benchmark's two measures, and the paper's step
selection (sec. 4.4) with the oracle in place of CLIP.

- fidelity: fraction of renders of "a photo of <concept>" in which the oracle finds the concept (its shape,
  color, texture and mark);
- text alignment: fraction of renders of new-context prompts (a new background; a second object) in which the
  oracle finds what the prompt asked for (the background; the second object's shape and color).
Beside them, `in_context`: how often the concept itself is found in those new-context renders (alignment does
not ask for it, as the paper's text similarity does not; a product that vanishes from new scenes shows here).

The benchmark (benchmarks/concept_quality.py) reports them on seeds 0.. and 1000..; step selection scores on
seeds VALIDATION_SEED.. so that choosing a step never sees the renders it is reported on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from perfusion.clip_scoring import ClipScorer, superclass_prompt
from perfusion.concept import Concept
from perfusion.covariance import Covariance
from perfusion.models import BaseModel
from perfusion.sampling import ConceptRenderer, RenderRequest, RenderSettings
from perfusion.toyworld.oracle import Reading, has_concept, read_batch
from perfusion.toyworld.world import PALETTE, PersonalConcept
from perfusion.training import Scorer

SECOND_OBJECTS = (("red", "circle"), ("yellow", "triangle"), ("white", "cross"), ("blue", "star"))
ATTRIBUTES = ("shape", "color", "texture", "mark")
RENDER = RenderSettings(steps=25, guidance_scale=4.0, batch_size=32)  # the benchmark's sampler
VALIDATION_SEED = 5000  # step selection's renders; the reported ones use seeds below 2000


@dataclass(frozen=True)
class ContextPrompt:
    prompt: str
    background: str  # the background the prompt asks for
    second: tuple[str, str] | None  # (color, shape) of the second object it asks for, if any


def context_prompts(concept: PersonalConcept, token: str, count: int) -> list[ContextPrompt]:
    """New-context prompts: a new background, every other one with a second object (never of the
    background's or the concept's color, so the oracle can tell them apart)."""
    backgrounds = [c for c in PALETTE if c != concept.color]
    out = []
    for k in range(count):
        background = backgrounds[k % len(backgrounds)]
        if k % 2 == 0:
            out.append(ContextPrompt(f"{token} on a {background} background", background, None))
        else:
            color, shape = next(
                o for o in SECOND_OBJECTS[k % 4 :] + SECOND_OBJECTS if o[0] not in (background, concept.color)
            )
            prompt = f"{token} and a {color} {shape} on a {background} background"
            out.append(ContextPrompt(prompt, background, (color, shape)))
    return out


def aligned(reading: Reading, context: ContextPrompt) -> bool:
    """The render shows what the context prompt asked for."""
    second = context.second
    return reading.background == context.background and (second is None or reading.describes(second[1], second[0]))


def attribute_rates(readings: list[Reading], concept: PersonalConcept) -> dict[str, float]:
    """Per attribute: fraction of renders with an object that has the concept's value of it."""
    wanted = {"shape": concept.superclass, "color": concept.color, "texture": concept.texture, "mark": concept.mark}
    return {
        a: float(np.mean([any(getattr(o, a) == wanted[a] for o in r.objects) for r in readings])) for a in ATTRIBUTES
    }


@dataclass(frozen=True)
class ConceptScore:
    fidelity: float
    alignment: float
    rates: dict[str, float] = field(default_factory=dict)  # the fidelity renders' attribute rates
    in_context: float = 0.0  # fraction of the new-context renders in which the concept is found
    clip_i: float = float("nan")  # the paper's CLIP-I of the fidelity renders vs the training images (with a scorer)
    clip_t: float = float("nan")  # CLIP-T of the context renders vs their prompts, token -> superclass word

    @property
    def harmonic(self) -> float:
        """The paper's step-selection criterion: harmonic mean of fidelity and alignment."""
        total = self.fidelity + self.alignment
        return 2 * self.fidelity * self.alignment / total if total else 0.0


def score_concept(
    renderer: ConceptRenderer,
    concept: PersonalConcept,
    token: str,
    samples: int,
    gates: dict[str, tuple[float, float]] | None = None,
    seed: int = 0,
    clip: ClipScorer | None = None,
    references: list[np.ndarray] | None = None,
    settings: RenderSettings = RENDER,
) -> ConceptScore:
    """Render `samples` fidelity prompts (seeds seed..) and `samples` context prompts (seeds seed+1000..).
    With a CLIP `clip` and the concept's training images (`references`), CLIP-I and CLIP-T beside the oracle."""
    gates = gates or {}
    fidelity_requests = [RenderRequest(f"a photo of {token}", seed=seed + s, gates=gates) for s in range(samples)]
    contexts = context_prompts(concept, token, samples)
    context_requests = [RenderRequest(c.prompt, seed=seed + 1000 + s, gates=gates) for s, c in enumerate(contexts)]
    images = list(renderer.render_arrays(fidelity_requests + context_requests, settings))
    readings = read_batch(images)
    fidelity = float(np.mean([has_concept(r, concept) for r in readings[:samples]]))
    alignment = float(np.mean([aligned(r, c) for r, c in zip(readings[samples:], contexts, strict=True)]))
    in_context = float(np.mean([has_concept(r, concept) for r in readings[samples:]]))
    clip_i = clip_t = float("nan")
    if clip is not None:
        if not references:
            raise ValueError("CLIP-I needs the concept's training images (references)")
        clip_i = clip.image_similarity(images[:samples], references)
        plain = [superclass_prompt(c.prompt, {token: concept.superclass}) for c in contexts]
        clip_t = clip.text_similarity(images[samples:], plain)
    return ConceptScore(fidelity, alignment, attribute_rates(readings[:samples], concept), in_context, clip_i, clip_t)


def oracle_scorer(
    load_base: Callable[[], BaseModel],
    covariance: Covariance,
    concept: PersonalConcept,
    samples: int = 16,
    log: Callable[[str], None] | None = None,
) -> Scorer:
    """A train_concept scorer: the harmonic mean of fidelity and alignment on validation seeds.
    `load_base` returns a fresh base model (a renderer adds the concept's token to its tokenizer)."""

    def score(snapshot: Concept, step: int) -> float:
        renderer = ConceptRenderer(load_base(), covariance)
        renderer.attach(snapshot)
        result = score_concept(renderer, concept, snapshot.token, samples, seed=VALIDATION_SEED)
        if log is not None:
            log(f"step {step}: validation fidelity {result.fidelity:.0%}, alignment {result.alignment:.0%}")
        return result.harmonic

    return score
