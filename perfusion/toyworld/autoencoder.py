"""An exact "autoencoder" for the toy model: the orthonormal 2x2 Haar wavelet transform (32x32x3 <-> 16x16x12).

Each 2x2 pixel block [[a, b], [c, d]] of each color channel becomes four coefficients

    LL = (a + b + c + d) / 2     LH = (a - b + c - d) / 2
    HL = (a + b - c - d) / 2     HH = (a - b - c + d) / 2

an orthonormal map (H @ H = I, so decoding applies the same matrix). Why not plain pixel-unshuffle: there the
four sub-pixels of a block are four independent channels, and an undertrained UNet gets each a little wrong
in its own way, which shows as a 2x2 checkerboard over every flat region (baseline v0). In the Haar basis a
flat region is LL alone with LH = HL = HH = 0, so an error in an object's or the background's color is a
smooth error, and the detail channels only carry edges. Orthonormal, so Gaussian noise stays white Gaussian
noise of the same variance in latent space and the diffusion math is unchanged.

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

# Rows: LL, LH, HL, HH; columns: the sub-pixels a (0,0), b (0,1), c (1,0), d (1,1) in pixel_unshuffle order.
HAAR_2X2 = 0.5 * torch.tensor(
    [
        [1.0, 1.0, 1.0, 1.0],
        [1.0, -1.0, 1.0, -1.0],
        [1.0, 1.0, -1.0, -1.0],
        [1.0, -1.0, -1.0, 1.0],
    ]
)


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


def _mix_subpixels(blocks: torch.Tensor) -> torch.Tensor:
    """(b, 3 * 4, h, w) grouped per color as 4 sub-pixels/coefficients -> the same with HAAR_2X2 applied."""
    b, channels, h, w = blocks.shape
    grouped = blocks.reshape(b, channels // 4, 4, h, w)
    mixed = torch.einsum("ij,bcjhw->bcihw", HAAR_2X2.to(blocks), grouped)
    return mixed.reshape(b, channels, h, w)


def haar_encode(images: torch.Tensor) -> torch.Tensor:
    """images (b, 3, h, w) -> latents (b, 12, h/2, w/2), exactly invertible by haar_decode."""
    return _mix_subpixels(F.pixel_unshuffle(images, 2))


def haar_decode(latents: torch.Tensor) -> torch.Tensor:
    """latents (b, 12, h, w) -> images (b, 3, 2h, 2w); HAAR_2X2 is its own inverse."""
    return F.pixel_shuffle(_mix_subpixels(latents), 2)


class HaarAutoencoder(ModelMixin, ConfigMixin):  # type: ignore[misc]
    @register_to_config  # type: ignore[untyped-decorator]
    def __init__(
        self,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        # Not layers: the pipeline derives its scale factor as 2 ** (len(block_out_channels) - 1) = 2.
        block_out_channels: tuple[int, ...] = (3, 12),
    ) -> None:
        super().__init__()
        if len(block_out_channels) != 2:
            raise ValueError("the Haar autoencoder downsamples by exactly 2: block_out_channels needs 2 entries")
        # A buffer so ModelMixin can report a dtype and device (there are no parameters).
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels * 4)

    def encode(self, images: torch.Tensor, return_dict: bool = True) -> EncoderOutput:
        """images (b, 3, h, w) in [-1, 1] -> latents (b, 12, h/2, w/2), exactly."""
        return EncoderOutput(ExactLatent(haar_encode(images)))

    def decode(
        self, latents: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        images = haar_decode(latents)
        return DecoderOutput(images) if return_dict else (images,)
