"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np
import torch


def random_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    """(count, dim) float64 standard normal, seeded."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, dim)))


def state_dicts(base) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Copies of every base weight (UNet, text encoder, VAE), for bit-identity checks."""
    out = {}
    for prefix, module in (("unet", base.unet), ("text", base.text_encoder), ("vae", base.pipeline.vae)):
        out |= {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return out
