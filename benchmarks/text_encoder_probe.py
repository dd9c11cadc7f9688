"""How well a text encoder suits Perfusion's gate: cond(C) on its own corpus and context stability.

    python -m benchmarks.text_encoder_probe --clip perfusion/assets/toy-clip       # the shipped toy CLIP
    python -m benchmarks.text_encoder_probe --clip /tmp/probe --read-layer -2      # a probe, another layer
    python -m benchmarks.text_encoder_probe --base toy                             # a base's own text encoder

For each shape word of the toy world: s(e) (eq. 3) against i_super from "a photo of a {word}", at the word in
24 contexts that change what comes before it, at every other real token of those prompts, and at the first
padding positions (perfusion/stability.py). Targets: cond(C) <= 1e5; s >= 0.8 at the word (p10) and
<= 0.2 elsewhere (p95). A CLIP folder also gets its zero-shot accuracy and retrieval top-1 (toyworld/clip.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import perfusion
from perfusion.covariance import Covariance, second_moment
from perfusion.stability import StabilityReport, context_stability
from perfusion.toyworld import language, world


def probe(encode, tokenizer, corpus: list[str]) -> tuple[Covariance, list[StabilityReport]]:  # type: ignore[no-untyped-def]
    moment, count = second_moment(encode, tokenizer, corpus)
    covariance = Covariance.from_second_moment(moment, "probe", count)
    shapes = world.SHAPES
    reports = [
        context_stability(encode, tokenizer, covariance.c_inv, word, shapes[(k + 1) % len(shapes)])
        for k, word in enumerate(shapes)
    ]
    return covariance, reports


def layer_norm_direction(module: torch.nn.Module) -> torch.Tensor | None:
    """The one direction a final LayerNorm pins: y . (1/gamma) = beta . (1/gamma) for every output y (mean 0 of
    (y - beta) / gamma). No encoding, a concept's included, has any other component there."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    if not norms or norms[-1].weight is None:
        return None
    direction = 1 / norms[-1].weight.detach().double()
    return direction / direction.norm()


def condition_off(moment: torch.Tensor, direction: torch.Tensor) -> float:
    """cond(C) on the complement of `direction` (unit): the spread the encodings can actually have."""
    projector = torch.eye(len(direction), dtype=torch.float64) - torch.outer(direction, direction)
    eigenvalues = torch.linalg.eigvalsh(projector @ moment @ projector)[1:]  # [0] is the projected-out direction
    return float(eigenvalues.max() / eigenvalues.min())


def print_report(
    label: str, covariance: Covariance, reports: list[StabilityReport], pinned: torch.Tensor | None = None
) -> None:
    eigenvalues = torch.linalg.eigvalsh(covariance.second_moment)
    print(f"{label}: cond(C) = {covariance.condition_number():.3g} ({covariance.token_count} tokens)")
    smallest = " ".join(f"{e:.3g}" for e in eigenvalues[:3])
    print(f"  eigenvalues: largest {eigenvalues[-1]:.3g}, smallest {smallest}")
    if pinned is not None:
        share = float(pinned @ covariance.second_moment @ pinned)
        print(
            f"  the final LayerNorm's pinned direction: second moment {share:.3g};"
            f" cond(C) without it = {condition_off(covariance.second_moment, pinned):.3g}"
        )
    print(f"{'word':10} {'at p10':>7} {'median':>7} {'else p95':>9} {'else max':>9} {'pad p95':>8}")
    for report in reports:
        row = report.summary()
        print(
            f"{report.word:10} {row['at word p10']:7.2f} {row['at word median']:7.2f} {row['elsewhere p95']:9.2f}"
            f" {row['elsewhere max']:9.2f} {row['padding p95']:8.2f}"
        )
    pooled = StabilityReport("all")
    for report in reports:
        pooled.at_word += report.at_word
        pooled.elsewhere += report.elsewhere
        pooled.padding += report.padding
    row = pooled.summary()
    print(
        f"{'all':10} {row['at word p10']:7.2f} {row['at word median']:7.2f} {row['elsewhere p95']:9.2f}"
        f" {row['elsewhere max']:9.2f} {row['padding p95']:8.2f}"
    )
    at = np.array(pooled.at_word)
    print("at-word distribution (deciles):", " ".join(f"{q:.2f}" for q in np.quantile(at, np.linspace(0, 1, 11))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=None, help="a toy CLIP folder (toyworld/clip.py)")
    parser.add_argument("--read-layer", type=int, default=None, help="text layer to probe (default: the recipe's)")
    parser.add_argument("--base", default=None, help="a base model instead: its text encoder's output")
    parser.add_argument("--no-zero-shot", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.base is not None:
        base = perfusion.load_base(args.base)
        corpus = base.captions()
        covariance, reports = probe(lambda ids: base.text_encoder(ids)[0], base.tokenizer, corpus)
        print_report(f"base {args.base}", covariance, reports, layer_norm_direction(base.text_encoder))
        return
    from transformers import CLIPModel, CLIPTokenizer

    from perfusion.toyworld.clip import load_recipe, read_states
    from perfusion.toyworld.clip_eval import zero_shot

    model = CLIPModel.from_pretrained(args.clip, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.clip)
    layers = [args.read_layer] if args.read_layer is not None else [load_recipe(args.clip).read_layer]
    for layer in layers:
        with torch.no_grad():
            covariance, reports = probe(
                lambda ids, layer=layer: read_states(model, ids, layer)[0], tokenizer, language.caption_corpus(3000)
            )
        print_report(f"{args.clip} layer {layer}", covariance, reports, layer_norm_direction(model.text_model))
    if not args.no_zero_shot:
        for name, value in zero_shot(model, tokenizer).items():
            print(f"zero-shot {name}: {value:.1%}")


if __name__ == "__main__":
    main()
