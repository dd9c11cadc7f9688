"""UNet configs of real Stable Diffusion families, for benchmarks that need the shapes but no weights."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

# text width d = cross_attention_dim; embedding width of the concept token (SDXL: two encoders, 768 + 1280)
FAMILIES: dict[str, dict[str, Any]] = {
    "SD1.5": {
        "embedding_dim": 768,
        "unet": dict(
            sample_size=64,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
    },
    "SD2.1": {
        "embedding_dim": 1024,
        "unet": dict(
            sample_size=96,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        ),
    },
    "SDXL": {
        "embedding_dim": 2048,
        "unet": dict(
            sample_size=128,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    },
}


def build_unet(family: str, device: str | torch.device = "meta", seed: int = 0) -> UNet2DConditionModel:
    """A UNet of that family's shape: on "meta" it has shapes and no memory; on "cpu" random weights."""
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**FAMILIES[family]["unet"])
