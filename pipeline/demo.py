"""The embedded demo: train two concepts, save them, reload them into a fresh pipeline and render prompts
that use one and both, with a contact sheet to look at. No downloads; a CPU is enough.

- base "toy": the project's pretrained toy-world model; the products are two of the world's personal
  concepts (a dotted purple star with a dot, a striped orange square with a notch), rendered in new scenes;
- base "tiny": random weights, so the pictures are texture; it shows the path works, in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import perfusion


@dataclass(frozen=True)
class DemoProduct:
    token: str
    superclass: str
    color: tuple[int, int, int]
    stripes: int  # the product's visual identity: a colored disc with this many stripes


PRODUCTS = (
    DemoProduct("<demo-mug>", "mug", (200, 40, 40), 3),
    DemoProduct("<demo-bag>", "bag", (40, 90, 200), 5),
)
PROMPTS = (
    "a photo of <demo-mug>",
    "a photo of <demo-mug> on the beach",
    "a photo of <demo-bag> in a kitchen",
    "<demo-mug> next to <demo-bag> on a wooden table",
)
TOY_PROMPTS = (
    "a photo of <dotted-star>",
    "<dotted-star> on a blue background",
    "<striped-square> on a white background",
    "a red circle and <striped-square> on a yellow background",
    "<dotted-star> and <striped-square> on a black background",
)


@dataclass(frozen=True)
class DemoSetup:
    base: str
    products: list[tuple[str, str, list[Image.Image]]]  # (token, superclass, photos)
    prompts: tuple[str, ...]
    config: perfusion.TrainConfig


def demo_setup(base: str, steps: int) -> DemoSetup:
    if base == "toy":
        from perfusion.toyworld.world import PERSONAL_CONCEPTS, concept_images

        chosen = PERSONAL_CONCEPTS[:2]
        return DemoSetup(
            base="toy",
            products=[(f"<{c.name}>", c.superclass, concept_images(c, 6, seed=i)) for i, c in enumerate(chosen)],
            prompts=TOY_PROMPTS,
            config=perfusion.TrainConfig(steps=steps, batch_size=8, flip_probability=0.0),  # a notch has a side
        )
    return DemoSetup(
        base=base,
        products=[(p.token, p.superclass, product_images(p, seed=i)) for i, p in enumerate(PRODUCTS)],
        prompts=PROMPTS,
        config=perfusion.TrainConfig(steps=steps, batch_size=4),
    )


def product_images(product: DemoProduct, count: int = 4, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """A few photos of one procedural product: same object, varied background, position and scale."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        background = tuple(int(c) for c in rng.integers(120, 255, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        radius = int(rng.integers(size // 4, size // 3 + 1))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=product.color)
        for k in range(product.stripes):
            y = cy - radius + (2 * k + 1) * radius // product.stripes
            draw.line((cx - radius + 2, y, cx + radius - 2, y), fill=(250, 250, 250), width=1)
        images.append(image)
    return images


def run_demo(
    out_dir: Path,
    steps: int = 60,
    base_name: str = "tiny",
    log: Callable[[str], None] = print,
    on_step: Callable[[str, perfusion.StepInfo], None] | None = None,
) -> dict[str, object]:
    """Train, save, reload, render. Returns a summary (also written to out_dir/summary.json)."""
    setup = demo_setup(base_name, steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "concepts").mkdir(exist_ok=True)
    (out_dir / "renders").mkdir(exist_ok=True)
    base = perfusion.load_base(setup.base)
    log(f"base model {setup.base!r} loaded (fingerprint {base.fingerprint})")
    covariance = perfusion.estimate_covariance(base)  # from the base's own captions (BaseModel.captions)
    log(f"covariance estimated from {covariance.token_count} caption tokens")

    files = {}
    for token, superclass, images in setup.products:
        name = token.strip("<>")
        for i, image in enumerate(images):
            image.resize((128, 128), Image.Resampling.NEAREST).save(out_dir / f"train-{name}-{i}.png")
        concept = perfusion.train_concept(
            base, images, token, superclass, setup.config, covariance=covariance, on_step=_tagged(on_step, token)
        )
        path = out_dir / "concepts" / f"{name}.safetensors"
        size = concept.save(path)
        files[token] = path
        loss = concept.metadata["loss"]
        log(f"trained {token} ({superclass}): loss {loss['first']:.3f} -> {loss['last']:.3f}, {size:,} bytes -> {path}")

    # A fresh pipeline, as a downstream app would have: concepts come only from their files.
    fresh = perfusion.load_base(setup.base)
    renderer = perfusion.ConceptRenderer(fresh, covariance)
    for path in files.values():
        renderer.attach(perfusion.load_concept_file(path.read_bytes(), fresh, name=str(path)))
    requests = [perfusion.RenderRequest(prompt, seed=seed) for prompt in setup.prompts for seed in (0, 1)]
    images = renderer.render(requests, perfusion.RenderSettings(steps=20, guidance_scale=4.0))
    for number, image in enumerate(images):
        image.save(out_dir / "renders" / f"{number:02d}.png")
    sheet = contact_sheet([(r.prompt, r.seed) for r in requests], images)
    sheet.save(out_dir / "contact_sheet.png")
    log(f"rendered {len(images)} images -> {out_dir / 'renders'}; contact sheet {out_dir / 'contact_sheet.png'}")
    summary = {
        "base": setup.base,
        "concepts": {token: str(path) for token, path in files.items()},
        "renders": len(images),
        "contact_sheet": str(out_dir / "contact_sheet.png"),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _tagged(
    on_step: Callable[[str, perfusion.StepInfo], None] | None, token: str
) -> Callable[[perfusion.StepInfo], None] | None:
    """Bind a concept's token to the progress callback."""
    if on_step is None:
        return None
    return lambda info: on_step(token, info)


def contact_sheet(captions: list[tuple[str, int]], images: list[Image.Image], cell: int = 128) -> Image.Image:
    """A grid: one row per prompt, one column per seed, captioned."""
    prompts = list(dict.fromkeys(prompt for prompt, _ in captions))
    seeds = list(dict.fromkeys(seed for _, seed in captions))
    label_width = 330
    sheet = Image.new("RGB", (label_width + cell * len(seeds), 20 + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, seed in enumerate(seeds):
        draw.text((label_width + column * cell + 4, 4), f"seed {seed}", fill="black")
    for (prompt, seed), image in zip(captions, images, strict=True):
        row, column = prompts.index(prompt), seeds.index(seed)
        draw.text((4, 20 + row * cell + cell // 2 - 6), prompt, fill="black")
        sheet.paste(
            image.resize((cell, cell), Image.Resampling.NEAREST), (label_width + column * cell, 20 + row * cell)
        )
    return sheet
