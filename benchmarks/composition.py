"""Several products in one scene, measured: every pair of the example catalog's products, by the oracle.

    python -m benchmarks.composition                         # trains the 4 products once, then measures
    python -m benchmarks.composition --variants "local,own token" --seeds 4
    python -m benchmarks.composition --untrained --seeds 1 --steps 5 --out /tmp/c   # a smoke run, seconds

Each product is trained once (key-locked Perfusion, the concept benchmark's recipe: 6 images, 400 steps,
batch 8, no flips) and its file kept in --concepts (reused on the next run when its base fingerprint
matches). Every unordered pair renders in each of PAIR_FORMS (perfusion/toyworld/composition.py) with
--seeds seeds; each product alone renders in SINGLE_FORMS as the reference. Per render the oracle says
whether each product's color is there, whether it is present (shape and color) and exact (texture and mark
too), whether the scene holds two objects or two copies of one product, and whether the background is the
one asked for; CLIP-I (a pair's
render against each product's training images) and CLIP-T (the prompt with each token replaced by its
superclass word) beside it. Variants are rendering options measured on the same concepts and seeds, with
their cost: UNet passes per denoising step and seconds per image.

Writes results/composition.md and, for the first concept variant, results/composition_failures.png: failing pair
renders beside the cross-attention maps of each product's token (perfusion/attention_maps.py, recorded in a
second render of those rows) and each product's gate at every prompt token (ConceptRenderer.token_gates).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

import perfusion
from benchmarks.flags import option, parse_flags
from perfusion.clip_scoring import ClipFolderError, ClipScorer, check_clip_folder, superclass_prompt
from perfusion.toyworld.clip import TOY_CLIP_DIR
from perfusion.toyworld.composition import PAIR_FORMS, SINGLE_FORMS, judge_pair, judge_single
from perfusion.toyworld.oracle import read_batch
from perfusion.toyworld.world import PERSONAL_CONCEPTS, concept_images

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {  # name -> RenderSettings fields
    "local": {"lock": "local"},  # the paper's local locking (the default)
    "global": {"lock": "global"},  # the paper's global locking: the K path reads the superclass prompt
    "own token": {"lock": "local", "edit_positions": "token"},  # local locking, each edit at its own token only
    # local locking, each edit everywhere but at the other concepts' tokens (one concept: the paper exactly)
    "not others' tokens": {"lock": "local", "edit_positions": "not_other_tokens"},
    # local locking, each edit confined per image position to where its token draws the cross-attention
    "regions": {"lock": "local", "edit_positions": "regions"},
    # No concepts: each token replaced by its product's description in words ("a dotted purple star with a
    # dot"), what the base itself can compose; the ceiling the base sets, not a method.
    "words": {},
    # Personalized Residuals concepts of the same products: with LAG (each residual where its token and macro
    # class draw the cross-attention, the default) and applied at every image position
    "residuals LAG": {"method": "residuals", "localized": True},
    "residuals everywhere": {"method": "residuals", "localized": False},
}
MAP_GRID = 16


@dataclass(frozen=True)
class CompositionConfig:
    seeds: int = option(4, "seeds per prompt")
    steps: int = option(400, "training steps per product")
    render_steps: int = option(25, "denoising steps per image")
    guidance: float = option(4.0, "classifier-free guidance scale")
    variants: str = option(
        "words,local,global,own token,not others' tokens,regions", f"comma-separated, from: {', '.join(VARIANTS)}"
    )
    untrained: bool = option(False, "no training: each product's step-0 concept (a smoke run of the pipeline)")
    concepts: str = option(str(RESULTS / "composition_concepts"), "folder of the products' concept files")
    residual_steps: int = option(150, "training steps per product of the residual variants (the paper: 150)")
    residual_concepts: str = option(
        str(RESULTS / "composition_residuals"), "folder of the products' residual concept files"
    )
    clip: str = option(str(TOY_CLIP_DIR), "a local CLIP folder for CLIP-I / CLIP-T; 'none' to skip")
    failures: int = option(8, "failing pair renders drawn in composition_failures.png")
    device: str = option("cpu", "cpu or cuda")
    out: Path = field(default=RESULTS, metadata={"help": "folder for composition.md and the pictures"})

    @property
    def chosen(self) -> list[str]:
        return self.variants.split(",")

    def problems(self) -> list[str]:
        found = [f"--variants: unknown {v!r}; choose from {list(VARIANTS)}" for v in self.chosen if v not in VARIANTS]
        found += [f"--{name} must be >= 1" for name in ("seeds", "steps", "render_steps") if getattr(self, name) < 1]
        if self.clip != "none":
            try:
                check_clip_folder(self.clip)
            except ClipFolderError as error:
                found.append(f"--clip: {error}")
        return found


@dataclass
class Tally:
    """Counts of one variant's renders (pairs and singles)."""

    pairs: int = 0
    each_present: int = 0  # products present, counted one by one (two per pair render)
    each_colored: int = 0  # products whose color is on some object
    both_present: int = 0
    both_exact: int = 0
    two_objects: int = 0
    copies: int = 0
    pair_background: list[bool] = field(default_factory=list)
    singles: int = 0
    single_present: int = 0
    single_exact: int = 0
    single_background: list[bool] = field(default_factory=list)
    clip_i: list[float] = field(default_factory=list)
    clip_t: list[float] = field(default_factory=list)
    seconds_per_image: float = 0.0

    def row(self, name: str) -> str:
        def share(count: int, total: int) -> str:
            return f"{count / total:.0%}" if total else "-"

        def mean(values: list[bool] | list[float], fmt: str = ".0%") -> str:
            return format(float(np.mean(values)), fmt) if values else "-"

        return (
            f"| {name} | 1 | {self.seconds_per_image:.2f} | {share(self.each_colored, 2 * self.pairs)} | "
            f"{share(self.each_present, 2 * self.pairs)} | {share(self.both_present, self.pairs)} | "
            f"{share(self.both_exact, self.pairs)} | {share(self.two_objects, self.pairs)} | "
            f"{share(self.copies, self.pairs)} | {mean(self.pair_background)} | "
            f"{share(self.single_present, self.singles)} | {share(self.single_exact, self.singles)} | "
            f"{mean(self.single_background)} | {mean(self.clip_i, '.3f')} | {mean(self.clip_t, '.3f')} |"
        )


HEADER = [
    "| variant | UNet passes a step | s / image | pair: each color | each present | both present | both exact "
    "| two objects | two copies | background | alone: present | exact | background | CLIP-I | CLIP-T |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def products(
    config: CompositionConfig, base: perfusion.BaseModel, covariance: Any, method: str = "perfusion"
) -> list[Any]:
    """One concept per catalog product: loaded from its folder (--concepts, --residual-concepts) when trained on
    this base with this recipe, else trained there. Perfusion: 400 steps, batch 8; residuals: the paper's
    recipe (batch 4, lr 1e-3) for --residual-steps."""
    residual = method == "residuals"
    folder = Path(config.residual_concepts if residual else config.concepts)
    steps = config.residual_steps if residual else config.steps
    concepts = []
    for spec in PERSONAL_CONCEPTS:
        token = f"<{spec.name}>"
        if config.untrained:
            initial = (
                perfusion.residual_training.initial_residual_concept if residual else perfusion.training.initial_concept
            )
            concepts.append(initial(base, token, spec.superclass))
            continue
        path = folder / f"{spec.name}.safetensors"
        if path.is_file():
            concept = perfusion.load_concept_file(path.read_bytes(), name=str(path))
            trained_steps = concept.metadata.get("train_config", {}).get("steps")
            if concept.fingerprint == base.fingerprint and trained_steps == steps:
                concepts.append(concept)
                continue
        print(f"training {token} ({method}, {steps} steps) ...", flush=True)
        if residual:
            recipe = perfusion.TrainConfig.for_method(method="residuals", steps=steps, flip_probability=0.0)
        else:
            recipe = perfusion.TrainConfig(steps=steps, batch_size=8, flip_probability=0.0)
        concept = perfusion.methods.method_named(method).train(
            base, concept_images(spec, 6, seed=11), token, spec.superclass, recipe, covariance=covariance
        )
        folder.mkdir(parents=True, exist_ok=True)
        concept.save(path)
        concepts.append(concept)
    return concepts


@dataclass(frozen=True)
class Render:
    prompt: str
    names: tuple[str, ...]  # the products it names, in template order ({a}, {b})
    background: str | None
    seed: int


def plan(seeds: int) -> list[Render]:
    renders = []
    for a, b in itertools.combinations(PERSONAL_CONCEPTS, 2):
        for template, background in PAIR_FORMS:
            prompt = template.format(a=f"<{a.name}>", b=f"<{b.name}>")
            renders += [Render(prompt, (a.name, b.name), background, seed) for seed in range(seeds)]
    for a in PERSONAL_CONCEPTS:
        for template, background in SINGLE_FORMS:
            prompt = template.format(a=f"<{a.name}>")
            renders += [Render(prompt, (a.name,), background, seed) for seed in range(seeds)]
    return renders


def described(prompt: str) -> str:
    """The prompt with each product's token replaced by the product in words."""
    for spec in PERSONAL_CONCEPTS:
        prompt = prompt.replace(f"<{spec.name}>", spec.description())
    return prompt


def measure(
    renderer: perfusion.ConceptRenderer,
    renders: list[Render],
    settings: perfusion.RenderSettings,
    clip: ClipScorer | None,
    in_words: bool = False,
) -> tuple[Tally, list[tuple[int, Any]]]:
    """(the tally, the failing pair renders as (index into renders, verdict)). in_words: the products
    described in words instead of their tokens."""
    by_name = {spec.name: spec for spec in PERSONAL_CONCEPTS}
    prompts = [described(r.prompt) if in_words else r.prompt for r in renders]
    requests = [perfusion.RenderRequest(prompt, seed=r.seed) for prompt, r in zip(prompts, renders, strict=True)]
    started = time.perf_counter()
    images = renderer.render_arrays(requests, settings)
    tally = Tally(seconds_per_image=(time.perf_counter() - started) / len(renders))
    failing = []
    for index, (render, reading) in enumerate(zip(renders, read_batch(list(images)), strict=True)):
        if len(render.names) == 2:
            a, b = (by_name[n] for n in render.names)
            verdict = judge_pair(reading, a, b, render.background)
            tally.pairs += 1
            tally.each_present += sum(verdict.present)
            tally.each_colored += sum(verdict.colored)
            tally.both_present += verdict.both_present
            tally.both_exact += verdict.both_exact
            tally.two_objects += verdict.two_objects
            tally.copies += verdict.copies
            if verdict.background is not None:
                tally.pair_background.append(verdict.background)
            if not verdict.both_present:
                failing.append((index, verdict))
        else:
            single = judge_single(reading, by_name[render.names[0]], render.background)
            tally.singles += 1
            tally.single_present += single.present
            tally.single_exact += single.exact
            if single.background is not None:
                tally.single_background.append(single.background)
    if clip is not None:
        # CLIP-I of a render and a product = its embedding . the mean of the product's training-image embeddings
        # (the mean cosine over the pairs, as ClipScorer.image_similarity), each image embedded once
        references = {s.name: clip.image_embeddings(concept_images(s, 6, seed=11)).mean(0) for s in PERSONAL_CONCEPTS}
        embedded = clip.image_embeddings(list(images))
        superclasses = {f"<{s.name}>": s.superclass for s in PERSONAL_CONCEPTS}
        for render, embedding in zip(renders, embedded, strict=True):
            tally.clip_i += [float(embedding @ references[n]) for n in render.names]
        plain = [superclass_prompt(r.prompt, superclasses) for r in renders]
        tally.clip_t.append(clip.text_similarity(list(images), plain))
    return tally, failing


def failure_sheet(
    renderer: perfusion.ConceptRenderer,
    settings: perfusion.RenderSettings,
    failing: list[tuple[Render, Any]],
    path: Path,
) -> None:
    """One row per failing pair render: the image, each product's token's cross-attention map (rendered again
    with the maps recorded: same seeds, same pixels), and the gate of each product at every prompt token."""
    if not failing:
        return
    maps = perfusion.CrossAttentionMaps(MAP_GRID)
    requests = [perfusion.RenderRequest(render.prompt, seed=render.seed) for render, _ in failing]
    images = renderer.render_arrays(requests, settings, attention_maps=maps)
    cell = 96
    sheet = Image.new("RGB", (cell * 3 + 640, cell * len(failing)), "white")
    draw = ImageDraw.Draw(sheet)
    tokenizer = renderer.base.tokenizer
    for row, ((render, verdict), request) in enumerate(zip(failing, requests, strict=True)):
        top = row * cell
        picture = Image.fromarray((images[row] * 255).round().astype(np.uint8))
        sheet.paste(picture.resize((cell, cell), Image.Resampling.NEAREST), (0, top))
        ids = tokenizer(render.prompt).input_ids
        attention = maps.of(row)  # (m, grid, grid)
        for column, name in enumerate(render.names):
            token_id = tokenizer.convert_tokens_to_ids(f"<{name}>")
            heat = attention[[k for k, i in enumerate(ids) if i == token_id]].sum(0)
            heat = (heat / heat.max().clamp_min(1e-8)).numpy()
            image = Image.fromarray((heat * 255).astype(np.uint8)).resize((cell, cell), Image.Resampling.BILINEAR)
            sheet.paste(image.convert("RGB"), (cell * (column + 1), top))
        gates = [
            word.replace("</w>", "") + ":" + "/".join(f"{value:.2f}" for value in values.values())
            for word, values in renderer.token_gates(request)
        ]
        text = [
            render.prompt,
            f"colored {verdict.colored}  present {verdict.present}  two objects {verdict.two_objects}  "
            f"copies {verdict.copies}",
        ]
        text += ["gates of eq. 3 (" + " / ".join(render.names) + ") at each token, before any confinement:"]
        text += [" ".join(gates[k : k + 5]) for k in range(0, len(gates), 5)]
        for line, words in enumerate(text):
            draw.text((cell * 3 + 6, top + 4 + 12 * line), words, fill="black")
    sheet.save(path)


def run(config: CompositionConfig) -> Path:
    base = perfusion.load_base("toy", device=config.device)
    covariance = perfusion.estimate_covariance(base)
    methods = {VARIANTS[v].get("method", "perfusion") for v in config.chosen if v != "words"}
    concepts = {method: products(config, base, covariance, method) for method in sorted(methods)}
    clip = ClipScorer.from_folder(config.clip, device=config.device) if config.clip != "none" else None
    renders = plan(config.seeds)
    recipe = "untrained (step 0)" if config.untrained else f"key-locked Perfusion, {config.steps} steps, 6 images"
    if "residuals" in methods and not config.untrained:
        recipe += f"; residuals {config.residual_steps} steps, batch 4"
    lines = [
        f"# Composition on toy {base.fingerprint[:12]} ({recipe}; {len(PAIR_FORMS)} pair forms and "
        f"{len(SINGLE_FORMS)} single forms x {config.seeds} seeds, {config.render_steps} DDIM steps, guidance "
        f"{config.guidance})",
        "",
        *HEADER,
    ]
    sheet_drawn = False
    for variant in config.chosen:
        renderer = perfusion.ConceptRenderer(perfusion.load_base("toy", device=config.device), covariance)
        fields = dict(VARIANTS[variant])
        for concept in concepts.get(fields.pop("method", "perfusion"), []):
            renderer.attach(concept)
        settings = perfusion.RenderSettings(
            steps=config.render_steps, guidance_scale=config.guidance, batch_size=24, **fields
        )
        tally, failing = measure(renderer, renders, settings, clip, in_words=variant == "words")
        lines.append(tally.row(variant))
        print(lines[-1], flush=True)
        if variant != "words" and not sheet_drawn:
            sheet_drawn = True
            config.out.mkdir(parents=True, exist_ok=True)
            shown = [(renders[index], verdict) for index, verdict in failing[: config.failures]]
            failure_sheet(renderer, settings, shown, config.out / "composition_failures.png")
    lines += [
        "",
        "Pairs: every unordered pair of the 4 products in each pair form; 'each color' and 'each present' count the "
        "two products of a render one by one (an object of its color; of its shape and color); 'both present' and "
        "'both exact' count only renders where the two are separate objects; 'two objects': the scene holds two or "
        "more separate objects, whatever they are. 'alone': each product by itself in the single forms. "
        f"composition_failures.png: the first concept variant's first {config.failures} failing pair renders. "
        "'words': no concepts, each token replaced by its product's description (what the base composes).",
    ]
    config.out.mkdir(parents=True, exist_ok=True)
    table = config.out / "composition.md"
    table.write_text("\n".join(lines) + "\n")
    print(f"wrote {table}")
    return table


if __name__ == "__main__":
    run(parse_flags(CompositionConfig, (__doc__ or "").splitlines()[0]))
