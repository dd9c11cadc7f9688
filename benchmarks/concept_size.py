"""Bytes per concept file for SD1.5-, SD2.1- and SDXL-shaped models (no weights: shapes from config).

    python -m benchmarks.concept_size

Target: <= 64 KB for SD1.5 in fp16; the paper quotes ~100 KB.
"""

from __future__ import annotations

import torch

from benchmarks.shapes import FAMILIES, build_unet
from perfusion.concept import Concept
from perfusion.models import cross_attention_layers

TARGET_SD15_FP16 = 64 * 1024


def concept_for(family: str) -> tuple[Concept, int, int]:
    unet = build_unet(family, device="meta")
    layers = cross_attention_layers(unet)
    d, embed = FAMILIES[family]["unet"]["cross_attention_dim"], FAMILIES[family]["embedding_dim"]
    concept = Concept(
        token="<sku-0000001>",
        superclass="backpack",
        embedding=torch.zeros(embed),
        target_input=torch.zeros(d),
        superclass_input=torch.zeros(d),
        value_targets={name: torch.zeros(layer.to_v.out_features) for name, layer in layers.items()},
        fingerprint="0" * 32,
        metadata={
            "train_config": {"steps": 400, "batch_size": 16, "lr_value": 0.03, "lr_embedding": 0.006},
            "loss": {"first": 0.1, "last": 0.05, "min": 0.04, "mean_last_10pct": 0.05, "steps": 400.0},
        },
    )
    inner = sum(layer.to_v.out_features + layer.to_k.out_features for layer in layers.values())
    return concept, len(layers), inner


def main() -> None:
    print(
        f"{'family':7} {'attn2':>5} {'K+V inner':>9} {'fp16 bytes':>11} {'fp32 bytes':>11} "
        f"{'fp32 K+V (paper table)':>23}"
    )
    for family in FAMILIES:
        concept, layer_count, inner = concept_for(family)
        fp16, fp32 = len(concept.to_bytes(torch.float16)), len(concept.to_bytes(torch.float32))
        keys_and_values = (inner + 2 * concept.target_input.numel()) * 4  # what storing o*_K too would cost
        print(f"{family:7} {layer_count:>5} {inner:>9,} {fp16:>11,} {fp32:>11,} {keys_and_values:>23,}")
        if family == "SD1.5":
            sd15 = fp16
    print(f"\nSD1.5 fp16 file / 64 KB target = {sd15 / TARGET_SD15_FP16:.2f}  (<= 1.00 meets the target)")
    print(f"SD1.5 fp16 file / the paper's 100 KB = {sd15 / 100_000:.2f}")


if __name__ == "__main__":
    main()
