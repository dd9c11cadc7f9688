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


def sd15_base(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
    """A random-weight pipeline of Stable Diffusion 1.5's shapes (UNet, 12-layer 768-wide CLIP text encoder,
    the 512 px VAE) around the project's small tokenizer: what GPU timings and memory need, no download."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel

    from perfusion.models import BaseModel, assemble_pipeline, clip_text_config, fingerprint
    from perfusion.vocab import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=768, intermediate=3072, layers=12, heads=12))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = assemble_pipeline(vae, text_encoder, tokenizer, build_unet("SD1.5", device="cpu", seed=seed), scheduler)
    pipeline.set_progress_bar_config(disable=True)
    identity = fingerprint(pipeline)
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return BaseModel(pipeline=pipeline, source="SD1.5-shaped (random weights)", fingerprint=identity)
