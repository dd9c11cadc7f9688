"""Bytes per concept file for SD1.5-, SD2.1- and SDXL-shaped models (no weights: shapes from config).

    python -m benchmarks.concept_size

Target: <= 64 KB for SD1.5 in fp16; the paper quotes ~100 KB. Personalized Residuals' files beside them
(SD1.5: ~1.24M parameters, ~2.5 MB in fp16 expected).
"""

from __future__ import annotations

import torch

from benchmarks.shapes import FAMILIES, build_unet
from perfusion.concept import Concept
from perfusion.config import TrainConfig
from perfusion.models import cross_attention_layers
from perfusion.residuals import ResidualConcept, projection_shape, rank_for, transformer_blocks

TARGET_SD15_FP16 = 64 * 1024
RESIDUAL_RANK = TrainConfig().residual_rank


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


def residual_concept_for(family: str) -> tuple[ResidualConcept, int]:
    """A residual concept of the family's shapes (zeros: the bytes depend on shapes only) and its block count."""
    unet = build_unet(family, device="meta")
    blocks = transformer_blocks(unet)
    up, down = {}, {}
    for name, block in blocks.items():
        out, inner = projection_shape(block)
        rank = rank_for(min(out, inner), RESIDUAL_RANK)
        up[name], down[name] = torch.zeros(out, rank), torch.zeros(rank, inner)
    residual = ResidualConcept(
        token="<sku-0000001>",
        superclass="backpack",
        embedding=torch.zeros(FAMILIES[family]["embedding_dim"]),
        up=up,
        down=down,
        fingerprint="0" * 32,
        blocks_fingerprint="0" * 32,
        metadata={"train_config": {"steps": 150, "batch_size": 4, "lr_residual": 0.001}},
    )
    return residual, len(blocks)


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
    print(f"\nPersonalized Residuals (rank ceil({RESIDUAL_RANK} x channels) on every transformer block's proj_out)")
    print(
        f"{'family':7} {'blocks':>6} {'parameters':>11} {'fp16 bytes':>11} {'fp32 bytes':>11} {'/ Perfusion fp16':>17}"
    )
    for family in FAMILIES:
        residual, blocks = residual_concept_for(family)
        fp16, fp32 = len(residual.to_bytes(torch.float16)), len(residual.to_bytes(torch.float32))
        perfusion_fp16 = len(concept_for(family)[0].to_bytes(torch.float16))
        print(
            f"{family:7} {blocks:>6} {residual.parameters:>11,} {fp16:>11,} {fp32:>11,} {fp16 / perfusion_fp16:>17.1f}"
        )


if __name__ == "__main__":
    main()
