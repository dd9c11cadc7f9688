"""An exact "autoencoder" for the toy model: pixel-unshuffle by 2 (32x32x3 <-> 16x16x12).

It sits in the VAE slot of a StableDiffusionPipeline, which then runs unchanged: the pipeline only needs
`config.block_out_channels` (for its scale factor 2 ** (len - 1)), `config.scaling_factor`, `encode` and
`decode`. Lossless, so the toy model's quality is the UNet's alone, and no VAE has to be trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


@dataclass
class ExactLatent:
    """Stands in for diffusers' DiagonalGaussianDistribution: a point mass (std 0)."""

    mean: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class EncoderOutput:
    latent_dist: ExactLatent


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):  # type: ignore[misc]
    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        in_channels: int = 3,
        factor: int = 2,
        scaling_factor: float = 1.0,
        # Not layers: the pipeline derives its scale factor as 2 ** (len(block_out_channels) - 1).
        block_out_channels: tuple[int, ...] = (3, 12),
    ) -> None:
        super().__init__()
        if 2 ** (len(block_out_channels) - 1) != factor:
            raise ValueError("block_out_channels must have log2(factor) + 1 entries")
        # A buffer so ModelMixin can report a dtype and device (there are no parameters).
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels * self.config.factor**2)

    def encode(self, images: torch.Tensor, return_dict: bool = True) -> EncoderOutput:
        """images (b, 3, h, w) in [-1, 1] -> latents (b, 3 f^2, h/f, w/f), exactly."""
        return EncoderOutput(ExactLatent(F.pixel_unshuffle(images, self.config.factor)))

    def decode(
        self, latents: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        images = F.pixel_shuffle(latents, self.config.factor)
        return DecoderOutput(images) if return_dict else (images,)
