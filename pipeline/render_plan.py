"""Render planning: a manifest's render jobs -> one PlannedImage per image, each with a deterministic render_id.

    job (templates x combinations x seeds) --resolve names in the concept index--> PlannedImage[]

A template with k placeholders ({a}, {b}, ...) is filled with every k-combination of the job's selected
concepts in name order (or the job's explicit combinations), capped at max_combinations; each filled prompt
renders images_per_prompt seeds. Zero-shot products render on their own MM-DiT base (the manifest's
zero_shot.base_model), so an image holds products of one kind: every-k combinations skip the ones that mix
kinds (explicit ones that mix are a manifest error), and each row says which base renders it. render_id
hashes everything that decides the pixels (base fingerprint, prompt, concept keys, seed, settings) plus the
job, so a rerun skips rows already rendered and a retrained concept (new concept_key) renders anew. Nothing
here touches Ray or a model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.index import ConceptIndex, Status
from pipeline.manifest import Manifest, RenderJob, placeholders

RENDER_VERSION = "1"  # bump when the same inputs would render different pixels


class RenderPlanError(Exception):
    """Concepts a render needs that are not usable (not trained, failed); nothing has rendered."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) before rendering:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


@dataclass(frozen=True)
class ConceptRef:
    """A trained concept as the renderers need it: where its file is and what it must hash to."""

    name: str
    token: str
    concept_key: str
    file_uri: str
    sha256: str
    zero_shot: bool = False  # onboarded for the zero-shot base (method zero-shot), not trained on the base


@dataclass(frozen=True)
class PlannedImage:
    """One image to render. Plain data: it travels to the Ray Data actors as a row of JSON strings."""

    render_id: str
    job: str
    template: str
    prompt: str
    seed: int
    concepts: tuple[ConceptRef, ...]  # in placeholder order
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # of the base that renders it

    @property
    def zero_shot(self) -> bool:
        """Rendered on the zero-shot base (its products are zero-shot ones)."""
        return bool(self.concepts) and self.concepts[0].zero_shot

    def to_record(self) -> dict[str, Any]:
        """The row as Ray Data carries it (strings and ints only, so every block has one Arrow schema)."""
        return {
            "render_id": self.render_id,
            "job": self.job,
            "template": self.template,
            "prompt": self.prompt,
            "seed": self.seed,
            "concepts": json.dumps([ref.__dict__ for ref in self.concepts]),
            "settings": json.dumps(self.settings, sort_keys=True),
        }


def combinations_for(manifest: Manifest, job: RenderJob, template: str) -> list[tuple[str, ...]]:
    """The concept-name tuples that fill `template`, in a stable order, capped at job.max_combinations. Drawn
    lazily: 1,000 concepts in a 5-placeholder prompt have ~8e12 combinations, and only the first are kept."""
    count = len(placeholders(template))
    if count == 0:
        return [()]
    if job.combinations is not None:
        found: Iterator[tuple[str, ...]] = (tuple(c) for c in job.combinations if len(c) == count)
    else:
        names = [c.name for c in manifest.selected_concepts(job)]
        zero_shot = manifest.zero_shot_names()
        found = (c for c in itertools.combinations(names, count) if len({n in zero_shot for n in c}) == 1)
    return list(itertools.islice(found, job.max_combinations))


def combination_count(manifest: Manifest, job: RenderJob, template: str) -> int:
    """How many combinations fill `template` before the max_combinations cap (counted, not listed)."""
    count = len(placeholders(template))
    if count == 0:
        return 1
    if job.combinations is not None:
        return sum(len(c) == count for c in job.combinations)
    zero_shot = manifest.zero_shot_names()
    selected = [c.name for c in manifest.selected_concepts(job)]
    kinds = sum(n in zero_shot for n in selected), sum(n not in zero_shot for n in selected)
    return sum(math.comb(k, count) for k in kinds)  # products of one kind share an image


def blocked_images(manifest: Manifest, jobs: Sequence[RenderJob], blocked: set[str]) -> int:
    """How many images of `jobs` need a concept in `blocked` (plan_job leaves them out)."""
    return sum(
        job.images_per_prompt
        for job in jobs
        for template in job.prompts
        for names in combinations_for(manifest, job, template)
        if blocked.intersection(names)
    )


def planned_images(manifest: Manifest, job: RenderJob) -> int:
    """How many images a job plans (combinations after the cap x seeds), from the manifest alone."""
    per_template = [min(combination_count(manifest, job, t), job.max_combinations) for t in job.prompts]
    return sum(per_template) * job.images_per_prompt


def capped_prompts(manifest: Manifest, jobs: Sequence[RenderJob]) -> list[str]:
    """A line for each prompt whose combinations the cap cuts: what validate and --dry-run say."""
    lines = []
    for job in jobs:
        for position, template in enumerate(job.prompts):
            total = combination_count(manifest, job, template)
            if total > job.max_combinations:
                lines.append(
                    f"{job.name} prompts[{position}]: {total:,} combinations, the first {job.max_combinations:,} "
                    "rendered (max_combinations)"
                )
    return lines


def needed_names(manifest: Manifest, jobs: Sequence[RenderJob]) -> list[str]:
    names = {n for job in jobs for t in job.prompts for combo in combinations_for(manifest, job, t) for n in combo}
    return sorted(names)


def resolve_concepts(
    manifest: Manifest, names: Sequence[str], index: ConceptIndex, fingerprint: str, zero_shot_fingerprint: str = ""
) -> tuple[dict[str, ConceptRef], dict[str, str]]:
    """(the latest successful training, or onboarding, of each name for this catalog and its base model (a
    zero-shot product's: `zero_shot_fingerprint`), the names that have none -> why, with the fix (never
    trained, its latest attempt failed, trained on another base))."""
    zero_shot = manifest.zero_shot_names()
    groups = [([n for n in names if n not in zero_shot], fingerprint, manifest.base_model)]
    groups.append(([n for n in names if n in zero_shot], zero_shot_fingerprint, manifest.zero_shot.base_model))
    found: dict[str, dict[str, Any]] = {}
    for group, group_fingerprint, _ in groups:
        if group:
            rows = index.latest(group, catalog=manifest.catalog, fingerprint=group_fingerprint)
            found |= {row["name"]: row for row in rows}
    blocked: dict[str, str] = {}
    for group, _, base_model in groups:
        for name in group:
            if name in found:
                continue
            verb = "onboarded" if name in zero_shot else "trained"
            attempts = index.latest([name], catalog=manifest.catalog, status=None)
            if attempts and attempts[0]["status"] != Status.SUCCEEDED:
                blocked[name] = (
                    f"concept {name!r} failed its last training ({attempts[0]['error']}); fix it and run "
                    "perfusion-batch train first"
                )
            elif attempts:
                blocked[name] = (
                    f"concept {name!r} was {verb} on another base model ({attempts[0]['base_model']}); "
                    f"{verb.removesuffix('ed')} it on {base_model!r} with perfusion-batch train first"
                )
            else:
                blocked[name] = f"concept {name!r} is not {verb} yet: run perfusion-batch train on this manifest first"
    refs = {
        name: ConceptRef(name, row["token"], row["concept_key"], row["file_uri"], row["sha256"], name in zero_shot)
        for name, row in found.items()
    }
    return refs, blocked


def plan_job(
    manifest: Manifest,
    job: RenderJob,
    concepts: dict[str, ConceptRef],
    fingerprint: str,
    zero_shot_fingerprint: str = "",
) -> list[PlannedImage]:
    """Every image of one job: templates in order, then combinations, then seeds. A row of zero-shot
    products carries (and its render_id hashes) the zero-shot base's fingerprint."""
    rows = []
    for template in job.prompts:
        for names in combinations_for(manifest, job, template):
            if any(n not in concepts for n in names):
                continue  # a concept that cannot render (RenderRun records these images as skipped)
            refs = tuple(concepts[n] for n in names)
            base_fingerprint = zero_shot_fingerprint if refs and refs[0].zero_shot else fingerprint
            prompt = template.format(**{chr(ord("a") + i): ref.token for i, ref in enumerate(refs)})
            settings = {
                "steps": job.steps,
                "guidance_scale": job.guidance_scale,
                "resolution": job.resolution,
                "scheduler": job.scheduler,
                "lock": job.lock,
                "negative_prompt": job.negative_prompt,
                "gates": {
                    ref.token: [job.gates[ref.name].beta, job.gates[ref.name].tau]
                    for ref in refs
                    if ref.name in job.gates
                },
            }
            if not job.localized:  # absent when on, so renders planned before the option keep their ids
                settings["localized"] = False
            for seed in range(job.seed, job.seed + job.images_per_prompt):
                identity = {
                    "version": RENDER_VERSION,
                    "catalog": manifest.catalog,
                    "job": job.name,
                    "fingerprint": base_fingerprint,
                    "prompt": prompt,
                    "concept_keys": [ref.concept_key for ref in refs],
                    "seed": seed,
                    "settings": settings,
                }
                digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
                rows.append(PlannedImage(digest, job.name, template, prompt, seed, refs, settings, base_fingerprint))
    return rows
