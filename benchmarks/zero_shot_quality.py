"""Zero-shot products (DynaIP on the toy MM-DiT) on the Perfusion benchmark's products and prompts, scored by
the oracle, with the paper's claims as ablations.

    python -m benchmarks.zero_shot_quality                      # the README's table (~15 min on 2 cores)
    python -m benchmarks.zero_shot_quality --quick              # one product, two variants (smoke run)
    python -m benchmarks.zero_shot_quality --adapter DIR/dynaip-adapter.safetensors
    python -m benchmarks.zero_shot_quality --variants "scale 2;last layer, scale 2" --products 2 --no-pairs

Per product (benchmarks/concept_quality.py's four, its reference photos concept_images(seed=11)):
- fidelity: "a photo of <product>" renders in which the oracle finds the exact product (shape, color,
  texture and mark), each attribute's rate beside it;
- alignment: new-context renders (a new background; a second object) showing what the prompt asked for, and
  "in context": the exact product found in those same renders (the "exact product in new scenes" target);
- variants: 3 reference photos (the method: image stream only at inference, the router's level weights);
  decoupling off (the references into the text stream too, as in training: the paper's ablation); the last
  vision layer alone (granularity weights 0, 0, 1: no hierarchical fusion); 1 reference photo; and the base
  with no reference, prompted with the superclass word (what the adapter adds);
- pairs: every two of the four products in the composition benchmark's pair prompts (both present: the
  shape and color of each, apart; both exact; copies of one product);
- onboarding seconds per product (3 photos, one vision pass) beside a Perfusion training of the catalog's
  400 steps on the toy UNet (timed over 20 steps, scaled), the concept file's bytes, the shipped weights.
Targets (issue 25): fidelity >= 60%, alignment >= 80%, in context >= 50%, pairs both present >= 60%.
Writes benchmarks/results/zero_shot_quality.md.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import perfusion
from benchmarks.flags import option, parse_flags
from benchmarks.quality_report import TABLE_HEADER, table_row
from perfusion.sampling import RenderRequest
from perfusion.toyworld.composition import PAIR_FORMS, judge_pair
from perfusion.toyworld.mmdit_model import ADAPTER_WEIGHTS, MMDIT_WEIGHTS, toy_image_prompt_kit
from perfusion.toyworld.oracle import read_batch
from perfusion.toyworld.scoring import RENDER, score_concept
from perfusion.toyworld.world import PERSONAL_CONCEPTS, PersonalConcept, concept_images
from perfusion.zero_shot import ZeroShotConcept, with_kit_fingerprint
from perfusion.zero_shot_render import ZeroShotRenderer

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, object]] = {
    "zero-shot, 3 refs": {"references": 3},
    "decoupling off": {"references": 3, "text_stream": True},
    "last layer only": {"references": 3, "granularity": (0.0, 0.0, 1.0)},
    "last layer, decoupling off": {"references": 3, "granularity": (0.0, 0.0, 1.0), "text_stream": True},
    "1 ref": {"references": 1},
    "no reference": {"references": 0},
    # inference-time knobs (the table's default rows leave them out: --variants)
    "mid layer only": {"references": 3, "granularity": (0.0, 1.0, 0.0)},
    "low layer only": {"references": 3, "granularity": (1.0, 0.0, 0.0)},
    "scale 2": {"references": 3, "scale": 2.0},
    "last layer, scale 2": {"references": 3, "granularity": (0.0, 0.0, 1.0), "scale": 2.0},
    "last layer, scale 0.5": {"references": 3, "granularity": (0.0, 0.0, 1.0), "scale": 0.5},
}
DEFAULT_VARIANTS = ";".join(
    ["zero-shot, 3 refs", "decoupling off", "last layer only", "last layer, decoupling off", "1 ref", "no reference"]
)


@dataclass(frozen=True)
class ZeroShotConfig:
    samples: int = option(16, "renders per measure (and per pair prompt: seeds per prompt / 4)")
    pair_seeds: int = option(4, "seeds per pair prompt (4 forms x 6 pairs x this)")
    quick: bool = option(False, "one product, two variants, no pairs (smoke run)")
    variants: str = option(DEFAULT_VARIANTS, f"';'-separated, from: {'; '.join(VARIANTS)}")
    products: int = option(4, "the first N of the benchmark's products")
    no_pairs: bool = option(False, "skip the pairs")
    adapter: str = option(str(ADAPTER_WEIGHTS), "the DynaIP adapter file")
    device: str = option("cpu", "cpu or cuda")
    out: Path = field(default=RESULTS, metadata={"help": "folder for the table"})

    @property
    def chosen(self) -> list[str]:
        return ["zero-shot, 3 refs", "no reference"] if self.quick else self.variants.split(";")

    def problems(self) -> list[str]:
        found = [] if os.path.isfile(self.adapter) else [f"--adapter: no file {self.adapter}; train one first"]
        unknown = [v for v in self.chosen if v not in VARIANTS]
        found += [f"--variants: unknown {unknown}; choose from {list(VARIANTS)}"] if unknown else []
        found += [] if self.samples >= 1 else ["--samples must be >= 1"]
        return found + ([] if 1 <= self.products <= len(PERSONAL_CONCEPTS) else ["--products must be 1 to 4"])


class ZeroShotBenchmark:
    def __init__(self, config: ZeroShotConfig) -> None:
        self.config = config
        self.base = perfusion.load_base("toy-mmdit", device=config.device)
        if config.adapter != str(ADAPTER_WEIGHTS):  # another adapter than the shipped one, on the same base
            from perfusion.models import fingerprint

            self.base.pipeline.transformer.to("cpu")
            kit = toy_image_prompt_kit(self.base.pipeline, Path(config.adapter))
            self.base.image_prompt = kit
            self.base.fingerprint = with_kit_fingerprint(fingerprint(self.base.pipeline), kit)
            for module in (*kit.modules(), self.base.pipeline.transformer):
                module.to(config.device).eval()
        self.products = PERSONAL_CONCEPTS[: 1 if config.quick else config.products]
        self.photos = {spec.name: concept_images(spec, 3, seed=11) for spec in self.products}

    def onboard(self, spec: PersonalConcept, references: int) -> ZeroShotConcept:
        return perfusion.onboard_concept(
            self.base, self.photos[spec.name][:references], f"<{spec.name}>", spec.superclass
        )

    def renderer(self, variant: str, *concepts: ZeroShotConcept) -> ZeroShotRenderer:
        options = VARIANTS[variant]
        renderer = ZeroShotRenderer(
            self.base,
            granularity=options.get("granularity"),  # type: ignore[arg-type]
            text_stream=bool(options.get("text_stream", False)),
            scale=float(options.get("scale", 1.0)),  # type: ignore[arg-type]
        )
        for concept in concepts:
            renderer.attach(concept)
        return renderer

    def table(self) -> list[str]:
        variants = self.config.chosen
        lines = [*TABLE_HEADER]
        for spec in self.products:
            for variant in variants:
                references = int(VARIANTS[variant]["references"])  # type: ignore[call-overload]
                if references:
                    renderer = self.renderer(variant, self.onboard(spec, references))
                    token = f"<{spec.name}>"
                else:  # the base alone, the product named by its superclass word
                    renderer, token = self.renderer(variant), f"a {spec.superclass}"
                score = score_concept(renderer, spec, token, self.config.samples)  # type: ignore[arg-type]
                lines.append(table_row(spec.name, variant, "-", [score], ""))
                print(lines[-1], flush=True)
        return lines

    def pairs(self) -> list[str]:
        concepts = {spec.name: self.onboard(spec, 3) for spec in self.products}
        renderer = self.renderer("zero-shot, 3 refs", *concepts.values())
        requests, judged = [], []
        for a, b in itertools.combinations(self.products, 2):
            for form, background in PAIR_FORMS:
                for seed in range(self.config.pair_seeds):
                    requests.append(RenderRequest(form.format(a=f"<{a.name}>", b=f"<{b.name}>"), seed=seed))
                    judged.append((a, b, background))
        readings = read_batch(list(renderer.render_arrays(requests, RENDER)))
        verdicts = [judge_pair(r, a, b, bg) for r, (a, b, bg) in zip(readings, judged, strict=True)]
        lines = [
            "| pair | renders | both present | both exact | copies of one | background |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for a, b in [*itertools.combinations(self.products, 2), (None, None)]:
            mine = [v for v, (x, y, _) in zip(verdicts, judged, strict=True) if a is None or (x, y) == (a, b)]
            backgrounds = [v.background for v in mine if v.background is not None]
            name = "all" if a is None or b is None else f"{a.name} + {b.name}"
            lines.append(
                f"| {name} | {len(mine)} | {np.mean([v.both_present for v in mine]):.0%} | "
                f"{np.mean([v.both_exact for v in mine]):.0%} | {np.mean([v.copies for v in mine]):.0%} | "
                f"{np.mean(backgrounds):.0%} |"
            )
            print(lines[-1], flush=True)
        return lines

    def costs(self) -> list[str]:
        seconds = []
        for spec in self.products:
            started = time.perf_counter()
            concept = self.onboard(spec, 3)
            seconds.append(time.perf_counter() - started)
        size = len(concept.to_bytes())
        toy = perfusion.load_base("toy")
        images = concept_images(self.products[0], 6, seed=11)
        steps = 20
        started = time.perf_counter()
        perfusion.train_concept(
            toy,
            images,
            "<timed>",
            self.products[0].superclass,
            perfusion.TrainConfig(steps=steps, batch_size=8, flip_probability=0.0),
            covariance=perfusion.estimate_covariance(toy),
        )
        perfusion_seconds = (time.perf_counter() - started) * 400 / steps
        onboard = statistics.median(seconds)
        shipped = (MMDIT_WEIGHTS.stat().st_size + Path(self.config.adapter).stat().st_size) / 2**20
        return [
            f"- onboarding a product (3 photos, one vision pass, CPU): median {onboard:.3f} s over "
            f"{len(seconds)} products; a Perfusion training of 400 steps on the toy UNet: ~{perfusion_seconds:.0f} s "
            f"(20 steps timed, scaled; includes its C^-1): {perfusion_seconds / onboard:.0f}x",
            f"- a zero-shot concept file: {size} bytes ({size / 1024:.1f} KB)",
            f"- shipped weights: toy-mmdit + adapter {shipped:.1f} MB (fp16)",
        ]


def main(argv: list[str] | None = None) -> None:
    config = parse_flags(ZeroShotConfig, (__doc__ or "").splitlines()[0], argv)
    bench = ZeroShotBenchmark(config)
    started = time.perf_counter()
    lines = [
        f"# Zero-shot quality on toy-mmdit {bench.base.fingerprint[:12]} ({config.samples} samples a measure; "
        "sampler: 25 steps, guidance 4)",
        "",
        *bench.table(),
    ]
    if not config.quick and not config.no_pairs and len(bench.products) >= 2:
        lines += ["", "## Two zero-shot products in one scene", "", *bench.pairs()]
    lines += ["", "## Costs", "", *bench.costs()]
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    config.out.mkdir(parents=True, exist_ok=True)
    default = config.variants == DEFAULT_VARIANTS and config.products == 4 and not config.no_pairs
    name = "zero_shot_quality.md" if default and not config.quick else "zero_shot_quality_variants.md"
    (config.out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
