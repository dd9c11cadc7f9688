"""The "toy" base model: a small Stable-Diffusion-shaped pipeline pretrained on the toy world.

    text encoder  CLIPTextModel, hidden 64, 2 layers, the project's BPE tokenizer (every world word one token)
    UNet          UNet2DConditionModel (64, 96, 128) on 16x16x12 latents, cross-attention at 8x8, 4x4 and mid
    autoencoder   exact orthonormal 2x2 Haar wavelet transform (autoencoder.py)
    scheduler     DDIM over a cosine (squaredcos_cap_v2) schedule, v-prediction

Weights are pretrained by `python -m perfusion.toyworld.pretrain` and shipped as
perfusion/assets/toy/toy.safetensors (fp16, EMA weights), so users and CI never retrain.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

from perfusion.models import assemble_pipeline, clip_text_config
from perfusion.toyworld.autoencoder import HaarAutoencoder
from perfusion.vocab import load_tiny_tokenizer

TOY_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
TOY_WEIGHTS = TOY_DIR / "toy.safetensors"


def build_toy_pipeline(weights: Path | None = TOY_WEIGHTS, seed: int = 0) -> StableDiffusionPipeline:
    """The toy pipeline; `weights=None` gives the random initialisation pretraining starts from."""
    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=64, intermediate=256, layers=2, heads=4))
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=12,
            out_channels=12,
            block_out_channels=(64, 96, 128),
            layers_per_block=1,  # 5 M parameters: ~0.8 s per batch of 64 on 2 CPU cores
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    if weights is not None:
        if not Path(weights).is_file():
            from perfusion.errors import BaseModelError

            raise BaseModelError(
                f"the toy model's weights are missing ({weights}); pretrain them with "
                "`python -m perfusion.toyworld.pretrain` (about an hour on 2 CPU cores)"
            )
        state = load_file(str(weights))
        unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[13:]: v.float() for k, v in state.items() if k.startswith("text_encoder.")})
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        # Sampling starts at the last training timestep (Lin et al. 2024, "Common diffusion noise schedules
        # and sample steps are flawed"): the toy world's flat backgrounds are the image mean, which a first
        # step that leaks signal would fix before the prompt has a say.
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    return assemble_pipeline(HaarAutoencoder(), text_encoder, tokenizer, unet, scheduler)
