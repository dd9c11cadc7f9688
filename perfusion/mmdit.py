"""A multimodal diffusion transformer base (MM-DiT, as SD3): its components and its rectified-flow sampler.

    transformer   diffusers' SD3Transformer2DModel: text and image tokens in their own streams (own norms,
                  QKV projections, MLPs) meeting in joint attention in every block
    text encoder  a CLIP text tower; its per-position states are the text stream's input and its pooled
                  (EOS) state conditions every block's adaptive norms beside the timestep
    autoencoder   any diffusers-style VAE (`encode(...).latent_dist`, `decode(...).sample`, scaling_factor)
    scheduler     FlowMatchEulerDiscreteScheduler: rectified flow, x_t = (1 - s) x_0 + s eps, the model
                  predicts the velocity v = eps - x_0 and sampling integrates dx/ds = v from s = 1 to 0

SD3's own pipeline wants three text encoders (two CLIPs and a T5); a base with one CLIP, such as the toy's,
is sampled here with the same scheduler and the same classifier-free guidance. `joint_attention_kwargs` reach
every block's attention processor: the seam an image-prompt adapter (dynaip.py) plugs into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModel

TINY_SEED = 0


@dataclass
class MMDiTPipeline:
    transformer: SD3Transformer2DModel
    text_encoder: CLIPTextModel
    tokenizer: Any
    vae: Any
    scheduler: FlowMatchEulerDiscreteScheduler
    text_tokens: int = 77  # the text stream's length; a causal encoder's first n states do not depend on more

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.transformer.config.sample_size * self.vae_scale_factor)

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.transformer, self.text_encoder, self.vae)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MMDiTPipeline:
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **_: Any) -> None:  # the sampler has no bar of its own (BaseModel API)
        return None

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, text_tokens) ids, padded; a prompt longer than the text stream is an error, not cut silently."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.text_tokens, return_tensors="pt")
        if ids.input_ids.shape[1] > self.text_tokens:
            lengths = [len(row) for row in self.tokenizer(list(prompts)).input_ids]
            longest = max(range(len(prompts)), key=lambda i: lengths[i])
            raise ValueError(
                f"prompt {prompts[longest]!r} is {lengths[longest]} tokens; this base reads {self.text_tokens}"
            )
        return ids.input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> per-position states (B, L, D) and pooled EOS states (B, D)."""
        output = self.text_encoder(ids)
        return output.last_hidden_state.to(self.dtype), output.pooler_output.to(self.dtype)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        states: torch.Tensor,
        pooled: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """v(x_s, s | text) for (B, C, h, w) latents at noise levels (B,) in [0, 1]."""
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        return self.transformer(
            hidden_states=latents,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            timestep=timesteps,
            joint_attention_kwargs=joint_attention_kwargs,
        ).sample

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        steps: int = 20,
        guidance: float = 4.0,
        joint_attention_kwargs: dict[str, Any] | None = None,
        negative_prompt: str = "",
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], one seed a prompt. With guidance > 1 the batch runs doubled,
        [unconditional; conditional] (as diffusers orders it), so adapters see 2B rows: rows B.. are the prompts."""
        count = len(prompts)
        size = self.transformer.config.sample_size
        channels = self.transformer.config.in_channels
        noise = [
            torch.randn(channels, size, size, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds
        ]
        latents = torch.stack(noise).to(self.device, self.dtype)
        guided = guidance > 1
        ids = self.token_ids([negative_prompt] * count + list(prompts) if guided else list(prompts))
        states, pooled = self.encode_prompts(ids)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        for t in scheduler.timesteps:
            sigma = (t / scheduler.config.num_train_timesteps).expand(len(ids)).to(self.dtype)
            model_in = torch.cat([latents, latents]) if guided else latents
            v = self.velocity(model_in, sigma, states, pooled, joint_attention_kwargs)
            if guided:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents).prev_sample
        scaling = getattr(self.vae.config, "scaling_factor", 1.0)
        images = self.vae.decode(latents / scaling).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def flow_training_pair(
    latents: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_s, s, v target) for a rectified-flow training step, s drawn logit-normal(0, 1) as in SD3 (Esser et
    al. 2024, sec. 3.1: the middle noise levels, where the content is decided, get the most samples)."""
    sigmas = torch.sigmoid(torch.randn(latents.shape[0], generator=generator)).to(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    s = sigmas.view(-1, 1, 1, 1)
    return (1 - s) * latents + s * noise, sigmas, noise - latents


def build_tiny_mmdit_base():  # type: ignore[no-untyped-def]
    """ "tiny-mmdit": a random SD3-shaped base built from config with a fixed seed, for unit tests."""
    from perfusion.models import BuiltinBase  # models imports nothing of this module; import here keeps it so

    pipeline = build_tiny_mmdit_pipeline()
    return BuiltinBase(pipeline, image_prompt=build_tiny_image_prompt_kit(pipeline.transformer))


def build_tiny_image_prompt_kit(transformer: torch.nn.Module, seed: int = TINY_SEED):  # type: ignore[no-untyped-def]
    """A random DynaIP adapter and vision tower (32x32 photos, 4 layers of width 32) on `transformer`, seeded.
    Its value projections are random rather than zero (an untrained adapter's), so a reference changes what
    renders, as a trained one's does."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from perfusion.dynaip import DynaIPAdapter, feature_levels
    from perfusion.zero_shot import ImagePromptKit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        config = CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
        )
        vision = CLIPVisionModel(config).eval()
        adapter = DynaIPAdapter(transformer, config.hidden_size, feature_levels(config.num_hidden_layers))
        for name, parameter in adapter.named_parameters():
            if name.endswith("v_ip.weight"):
                parameter.data.normal_(0, 0.2)
    return ImagePromptKit(adapter, vision, image_size=32)


def build_tiny_mmdit_pipeline(seed: int = TINY_SEED) -> MMDiTPipeline:
    """32x32 images, 16x16x4 latents, patch 2, 2 joint blocks of width 32, the tiny base's text encoder."""
    from perfusion.models import clip_text_config, tiny_vae
    from perfusion.vocab import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=32, intermediate=64, layers=2, heads=4))
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            pos_embed_max_size=16,
        )
        vae = tiny_vae()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return MMDiTPipeline(transformer, text_encoder, tokenizer, vae, scheduler, text_tokens=32)
