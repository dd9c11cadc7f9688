"""The "toy-mmdit" base: a small SD3-shaped transformer on the toy v4 world, its text encoder and latents.

    text encoder  the toy CLIP's text tower, frozen, read at the same layer as the toy UNet's (model.py)
    transformer   SD3Transformer2DModel: 8 joint blocks, width 128 (4 heads of 32), patch 2 on the 16x16x12
                  Haar latents (an 8x8 grid of image tokens), text stream of 48 tokens (the caption language's
                  longest caption is 44), pooled EOS state beside the timestep
    autoencoder   the exact Haar wavelet transform, the toy UNet's latent space
    scheduler     rectified flow (FlowMatchEulerDiscreteScheduler), shift 1

Pretrained by `python -m perfusion.toyworld.pretrain_mmdit` and shipped as
perfusion/assets/toy-mmdit/toy-mmdit.safetensors (fp16 EMA weights of the transformer only); pretrain.json
beside it lists each stage's command (a later stage starts from the shipped weights with `--init`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from perfusion.dynaip import DynaIPAdapter
from perfusion.errors import BaseModelError
from perfusion.mmdit import MMDiTPipeline
from perfusion.models import BuiltinBase, fingerprint
from perfusion.toyworld.autoencoder import HaarAutoencoder
from perfusion.toyworld.clip import TOY_CLIP_DIR, load_tower
from perfusion.toyworld.model import CAPTIONS_FILE, TEMPLATES_FILE, read_lines, toy_text_encoder
from perfusion.zero_shot import ImagePromptKit

MMDIT_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-mmdit"
MMDIT_WEIGHTS = MMDIT_DIR / "toy-mmdit.safetensors"
ADAPTER_WEIGHTS = MMDIT_DIR / "dynaip-adapter.safetensors"
TEXT_TOKENS = 48


def build_toy_mmdit_base() -> BuiltinBase:
    """The shipped toy MM-DiT with its shipped DynaIP adapter (zero-shot products), once trained."""
    pipeline = build_toy_mmdit_pipeline()
    if not ADAPTER_WEIGHTS.is_file():
        hint = (
            f"The toy MM-DiT's DynaIP adapter is missing ({ADAPTER_WEIGHTS}): train it with "
            "`python -m perfusion.toyworld.train_dynaip`"
        )
        return BuiltinBase(pipeline, read_lines(TEMPLATES_FILE), CAPTIONS_FILE, image_prompt_hint=hint)
    return BuiltinBase(pipeline, read_lines(TEMPLATES_FILE), CAPTIONS_FILE, image_prompt=toy_image_prompt_kit(pipeline))


def toy_vision_tower(clip_dir: Path = TOY_CLIP_DIR) -> CLIPVisionModel:
    """The toy CLIP's vision tower (32x32 photos, 4 layers of width 128), frozen: what the adapter reads."""
    vision = load_tower(CLIPVisionModel, clip_dir)
    return vision.requires_grad_(False).eval()


def toy_image_prompt_kit(pipeline: MMDiTPipeline, adapter_file: Path = ADAPTER_WEIGHTS) -> ImagePromptKit:
    """The adapter in `adapter_file` installed on the toy MM-DiT, with the toy CLIP's vision tower."""
    vision = toy_vision_tower()
    adapter = DynaIPAdapter.load(
        str(adapter_file), pipeline.transformer, vision.config.hidden_size, fingerprint(pipeline)
    )
    return ImagePromptKit(adapter, vision, image_size=vision.config.image_size)


def toy_transformer(text_width: int, pooled_width: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        num_layers=8,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=text_width,
        caption_projection_dim=128,
        pooled_projection_dim=pooled_width,
        pos_embed_max_size=16,
    )


def build_toy_mmdit_pipeline(
    weights: Path | None = MMDIT_WEIGHTS, clip_dir: Path = TOY_CLIP_DIR, seed: int = 0
) -> MMDiTPipeline:
    """The toy MM-DiT; `weights=None` gives the random transformer pretraining starts from."""
    text_encoder, tokenizer = toy_text_encoder(clip_dir)
    width = text_encoder.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = toy_transformer(width, width)
    if weights is not None:
        if not Path(weights).is_file():
            raise BaseModelError(
                f"the toy MM-DiT's weights are missing ({weights}); pretrain them with "
                "`python -m perfusion.toyworld.pretrain_mmdit`"
            )
        state = load_file(str(weights))
        transformer.load_state_dict(
            {k[len("transformer.") :]: v.float() for k, v in state.items() if k.startswith("transformer.")}
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return MMDiTPipeline(transformer, text_encoder, tokenizer, HaarAutoencoder(), scheduler, TEXT_TOKENS)
