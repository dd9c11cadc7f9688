"""Quality of the shipped toy model, scored by the oracle on prompts not used in pretraining.

    python -m benchmarks.toy_quality [--prompts 240] [--steps 25] [--guidance 4]
    python -m benchmarks.toy_quality --base toy-mmdit [--weights DIR/toy-mmdit.safetensors]   # the MM-DiT base

Prompts come from scenes of a seed the pretraining never drew, plus every held-out color-shape pair
(never shown in pretraining: a test of composition). For single-object prompts the oracle checks shape,
object color and background; for two-object prompts, that both objects are right; for prompts that ask for a
mark ("... with a notch"), that an object of that shape carries it. A quarter of the prompts leave the
background unsaid ("a photo of a red square", as product prompts do): single-object ones form their own row,
and for them "background" means a plain background of another color than the objects (a model that reads a
lone color word as the background floods the canvas with it). Targets (toy v4): one object >= 97% on shape,
color and background; held-out color-shape pairs >= 95%; two objects >= 90% with both right, background >= 95%.
Prompts are captions of the v4 caption language (language.py). Writes benchmarks/results/toy_samples.png.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import perfusion
from perfusion.toyworld.language import caption
from perfusion.toyworld.mmdit_model import build_toy_mmdit_pipeline
from perfusion.toyworld.model import build_toy_pipeline
from perfusion.toyworld.oracle import read_batch
from perfusion.toyworld.world import HELD_OUT, ObjectSpec, Scene, sample_scene

RESULTS = Path(__file__).resolve().parent / "results"


def unseen_scenes(count: int, seed: int = 90210) -> list[Scene]:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, two_objects=0.25) for _ in range(count)]
    backgrounds = ["white", "black", "blue", "yellow", "green", "red"]
    for index, (color, shape) in enumerate(sorted(HELD_OUT)):
        for k in range(4):
            background = [b for b in backgrounds if b != color][(index + k) % 5]
            scenes.append(Scene(background, (ObjectSpec(shape, color, "plain", "none", (16, 16), 9),)))
    return scenes


def score(scenes: list[Scene], prompts: list[str], images: np.ndarray) -> dict[str, dict[str, float]]:
    readings = read_batch(list(images))
    groups: dict[str, dict[str, list[bool]]] = {}
    for scene, prompt, reading in zip(scenes, prompts, readings, strict=True):
        held_out = any((o.color, o.shape) in HELD_OUT for o in scene.objects)
        said = scene.background in prompt.replace(",", " ").split()  # objects never share the background's color
        name = "held-out pairs" if held_out else ("two objects" if len(scene.objects) == 2 else "one object")
        if name == "one object" and not said:
            name = "no background"
        group = groups.setdefault(
            name, {"shape": [], "object color": [], "background": [], "all right": [], "mark": []}
        )
        background = (
            reading.background == scene.background
            if said
            else reading.background not in {o.color for o in scene.objects}
        )
        group["background"].append(background)
        shapes = all(reading.describes(o.shape) for o in scene.objects)
        colors = all(any(r.color == o.color for r in reading.objects) for o in scene.objects)
        if any(o.mark != "none" for o in scene.objects):  # nan for a group without marked prompts
            group["mark"].append(
                all(any(r.shape == o.shape and r.mark == o.mark for r in reading.objects) for o in scene.objects)
            )
        group["shape"].append(shapes)
        group["object color"].append(colors)
        group["all right"].append(
            shapes and colors and background and all(reading.describes(o.shape, o.color) for o in scene.objects)
        )
    return {
        name: {k: float(np.mean(v)) if v else float("nan") for k, v in g.items()} | {"n": float(len(g["shape"]))}
        for name, g in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--base", choices=("toy", "toy-mmdit"), default="toy", help="which toy base to score")
    parser.add_argument("--weights", type=Path, default=None, help="toy weights to score (default: the shipped ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sheet",
        type=Path,
        default=None,
        help="where the sample grid goes (default: benchmarks/results/<base>_samples.png for the shipped weights, "
        "none for --weights: a candidate must not replace the shipped base's picture)",
    )
    args = parser.parse_args()
    if args.sheet is None and args.weights is None:
        args.sheet = RESULTS / f"{args.base.replace('-', '_')}_samples.png"
    if args.weights is None:
        base = perfusion.load_base(args.base, device=args.device)
    else:
        pipeline = (
            build_toy_mmdit_pipeline(args.weights) if args.base == "toy-mmdit" else build_toy_pipeline(args.weights)
        )
        pipeline.set_progress_bar_config(disable=True)
        base = perfusion.BaseModel(pipeline, str(args.weights), perfusion.models.fingerprint(pipeline))
        pipeline.to(args.device)
    scenes = unseen_scenes(args.prompts)
    rng = random.Random(7)
    prompts = [caption(s, rng) for s in scenes]
    images = []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        seeds = [start + i for i in range(len(chunk))]
        if base.architecture == "mmdit":  # rectified flow, Euler steps
            out = base.pipeline.sample(chunk, seeds=seeds, steps=args.steps, guidance=args.guidance)
            images.append(out.permute(0, 2, 3, 1).cpu().numpy())
            continue
        out = base.pipeline(
            prompt=chunk,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="np",
        )
        images.append(np.asarray(out.images))
    pixels = np.concatenate(images)
    results = score(scenes, prompts, pixels)
    print(f"{args.weights or 'shipped toy weights'}, {args.device}")
    sampler = "Euler" if base.architecture == "mmdit" else "DDIM"
    settings = f"{sampler} {args.steps}, guidance {args.guidance}"
    print(f"{args.base} on {len(scenes)} unseen prompts ({settings}), oracle-scored:")
    print(f"{'prompts':16} {'n':>4} {'shape':>7} {'color':>7} {'backgr.':>8} {'all right':>10} {'mark':>7}")
    for name, row in sorted(results.items()):
        mark = "-" if np.isnan(row["mark"]) else f"{row['mark']:.1%}"
        print(
            f"{name:16} {int(row['n']):>4} {row['shape']:>7.1%} {row['object color']:>7.1%} "
            f"{row['background']:>8.1%} {row['all right']:>10.1%} {mark:>7}"
        )
    if args.sheet is None:
        return
    args.sheet.parent.mkdir(parents=True, exist_ok=True)
    sheet = Image.new("RGB", (8 * 100, 4 * 118), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(32):
        index = k * len(scenes) // 32
        tile = Image.fromarray((pixels[index] * 255).round().astype(np.uint8)).resize(
            (96, 96), Image.Resampling.NEAREST
        )
        x, y = (k % 8) * 100, (k // 8) * 118
        sheet.paste(tile, (x + 2, y + 2))
        draw.text((x + 2, y + 99), prompts[index][:17], fill="black")
    sheet.save(args.sheet)
    print(f"samples: {args.sheet}")


if __name__ == "__main__":
    main()
