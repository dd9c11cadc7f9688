"""Zero-shot concepts: a product onboarded from its photos with no training, for a DynaIP adapter (dynaip.py).

Onboarding runs the reference photos through the vision tower and the adapter's per-level experts once and
stores, per reference r and level l, the expert tokens T_rl (K, W) and the router's weights w_r (L,): a few KB
(3 references x 3 levels x 4 tokens x width 128 in fp16 = 9 KB on the toy). At render time the image prompt
is the references' fused tokens side by side, sum_l w_rl T_rl for r = 1..R -> (R K, W); weights given at
render time replace the router's (the granularity knob) without re-reading any photo.

File: safetensors, tensors "level_tokens" (R, L, K, W) and "router_weights" (R, L), metadata format
"zero-shot-concept" v1, the base fingerprint and the adapter's fingerprint (a hash of its weights: tokens of
one adapter mean nothing to another).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

from perfusion.concept import float_tensors
from perfusion.dynaip import DynaIPAdapter, ImagePromptCall, reference_features
from perfusion.errors import ConceptFileError, TrainingError
from perfusion.images import ImageInput, decode, resize_crop
from perfusion.methods import header_metadata

FORMAT = "zero-shot-concept"
VERSION = "1"


@dataclass
class ZeroShotConcept:
    name: str
    superclass: str  # the word that stands for the product in prompts (its placeholder's text)
    level_tokens: torch.Tensor  # (R, L, K, W)
    router_weights: torch.Tensor  # (R, L)
    base_fingerprint: str
    adapter_fingerprint: str

    def image_prompt(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(R K, W) tokens: each reference's levels mixed by its router weights, or by `weights` (L,)."""
        mix = self.router_weights if weights is None else torch.as_tensor(weights).expand_as(self.router_weights)
        if not torch.allclose(mix.sum(dim=-1), torch.ones(())):
            raise ValueError(f"{self.name}: granularity weights must sum to 1, got {mix[0].tolist()}")
        fused = (mix[:, :, None, None] * self.level_tokens).sum(dim=1)  # (R, K, W)
        return fused.reshape(-1, fused.shape[-1])

    def to_bytes(self) -> bytes:
        tensors = {
            "level_tokens": self.level_tokens.half().contiguous(),
            "router_weights": self.router_weights.float().contiguous(),
        }
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "superclass": self.superclass,
            "base_fingerprint": self.base_fingerprint,
            "adapter_fingerprint": self.adapter_fingerprint,
        }
        return save(tensors, metadata=metadata)


def reference_pixels(
    images: list[ImageInput],
    product: str,
    size: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """(R, 3, size, size) vision-tower input from a product's photos (resized, center-cropped, normalised as
    the tower's processor says; the toy CLIP's mean = std = 0.5). TrainingError naming the product and photo
    for one that does not decode, is not RGB, or is smaller than the tower reads."""
    if not images:
        raise TrainingError(f"product {product!r}: no reference photos; a zero-shot product needs 1 or more")
    pixels = []
    for index, image in enumerate(images):
        picture = decode(image, product, index, mode=None, kind="reference photo")
        label = image if isinstance(image, str) else f"#{index}"
        if picture.mode != "RGB":
            raise TrainingError(
                f"product {product!r}: reference photo {label} is {picture.mode!r}, not RGB; supply a color photo"
            )
        if min(picture.size) < size:
            raise TrainingError(
                f"product {product!r}: reference photo {label} is {picture.width}x{picture.height} pixels; "
                f"this vision tower reads {size}x{size}: supply one at least that large"
            )
        array = np.asarray(resize_crop(picture, size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        pixels.append((torch.from_numpy(array) - torch.tensor(mean)) / torch.tensor(std))
    return torch.stack(pixels).permute(0, 3, 1, 2)


def adapter_fingerprint(adapter: DynaIPAdapter) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(adapter.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def onboard(
    name: str,
    superclass: str,
    pixels: torch.Tensor,
    adapter: DynaIPAdapter,
    vision: torch.nn.Module,
    base_fingerprint: str,
) -> ZeroShotConcept:
    """A product from its preprocessed reference photos (R, 3, H, W): one vision pass, no training."""
    features = reference_features(vision, pixels, adapter.levels)
    fusion = adapter.fusion
    level_tokens = torch.stack([expert(f) for expert, f in zip(fusion.experts, features, strict=True)], dim=1)
    _, weights = fusion(features)
    return ZeroShotConcept(
        name, superclass, level_tokens.float(), weights.float(), base_fingerprint, adapter_fingerprint(adapter)
    )


def load_zero_shot_concept(
    data: bytes, base_fingerprint: str | None = None, adapter: DynaIPAdapter | None = None, *, name: str | None = None
) -> ZeroShotConcept:
    """Read a zero-shot concept file; ConceptFileError naming it when it is not one, is corrupt, or belongs to
    another base or adapter."""
    label = name or "<zero-shot concept bytes>"
    metadata = header_metadata(data)
    if metadata is None or metadata.get("format") != FORMAT:
        raise ConceptFileError(f"{label}: not a zero-shot concept file (format={(metadata or {}).get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ConceptFileError(f"{label}: zero-shot concept version {metadata.get('version')!r}; this reads {VERSION}")
    tensors = float_tensors(data, label)
    tokens, weights = tensors.get("level_tokens"), tensors.get("router_weights")
    if tokens is None or weights is None or tokens.dim() != 4 or weights.shape != tokens.shape[:2]:
        raise ConceptFileError(f"{label}: level_tokens (R, L, K, W) and router_weights (R, L) expected")
    if not (torch.isfinite(tokens).all() and torch.isfinite(weights).all()):
        raise ConceptFileError(f"{label}: the file holds NaN or infinite values; onboard the product again")
    if base_fingerprint is not None and metadata.get("base_fingerprint") != base_fingerprint:
        raise ConceptFileError(
            f"{label}: onboarded for another base (fingerprint {metadata.get('base_fingerprint')}, this base "
            f"{base_fingerprint}); a zero-shot product renders only on the MM-DiT base it was onboarded for"
        )
    if adapter is not None and metadata.get("adapter_fingerprint") != adapter_fingerprint(adapter):
        raise ConceptFileError(f"{label}: onboarded with another DynaIP adapter; onboard the product again")
    return ZeroShotConcept(
        metadata.get("name", label),
        metadata.get("superclass", ""),
        tokens,
        weights,
        metadata.get("base_fingerprint", ""),
        metadata.get("adapter_fingerprint", ""),
    )


def image_prompt_call(
    rows: list[ZeroShotConcept | None], guided: bool, weights: torch.Tensor | None = None
) -> ImagePromptCall:
    """The injection for one batch of prompts, one product (or None) a row, at inference (image stream only).
    Rows' prompts of different lengths (references) are padded and masked; with guidance the batch is
    [unconditional; conditional] (mmdit.MMDiTPipeline.sample) and the unconditional half gets none."""
    prompts = [None if concept is None else concept.image_prompt(weights) for concept in rows]
    width = next((p.shape[-1] for p in prompts if p is not None), 1)
    longest = max((p.shape[0] for p in prompts if p is not None), default=1)
    tokens = torch.zeros(len(rows), longest, width)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    mask[:, 0] = True  # a row with no product attends to one zero token, gated off by `present`
    for index, prompt in enumerate(prompts):
        if prompt is not None:
            tokens[index, : len(prompt)] = prompt
            mask[index, : len(prompt)] = True
    present = torch.tensor([p is not None for p in prompts])
    if guided:
        tokens, mask = torch.cat([tokens, tokens]), torch.cat([mask, mask])
        present = torch.cat([torch.zeros_like(present), present])
    return ImagePromptCall(tokens, present, text_stream=False, token_mask=mask)
