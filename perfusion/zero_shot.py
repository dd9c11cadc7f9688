"""Zero-shot concepts: a product onboarded from its photos with no training, for a DynaIP adapter (dynaip.py).

Onboarding runs the reference photos through the vision tower and the adapter's per-level experts once and
stores, per reference r and level l, the expert tokens T_rl (K, W) and the router's weights w_r (L,): a few KB
(3 references x 3 levels x 4 tokens x width 128 in fp16 = 9 KB on the toy). At render time the image prompt
is the references' fused tokens side by side, sum_l w_rl T_rl for r = 1..R -> (R K, W); weights given at
render time replace the router's (the granularity knob) without re-reading any photo.

File: safetensors, tensors "level_tokens" (R, L, K, W) and "router_weights" (R, L), metadata format
"zero-shot-concept" v1, the token and superclass, the base fingerprint (of the MM-DiT with its image-prompt
kit: tokens of one adapter mean nothing to another) and the adapter's own fingerprint.

A base renders zero-shot products when it carries an `ImagePromptKit` (BaseModel.image_prompt): the DynaIP
adapter installed on its transformer and the vision tower the adapter reads. `onboard_concept` is the
method's "trainer" (perfusion.methods: same signature as a training; no step is taken).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from perfusion.decoding import over_white
from perfusion.dynaip import DynaIPAdapter, ImagePromptCall, reference_features
from perfusion.errors import BaseModelError, ConceptFileError, TrainingError
from perfusion.file_format import float_tensors, read_metadata, refuse_unknown_tensors, seal
from perfusion.images import ImageInput, decode, image_label, resize_crop

FORMAT = "zero-shot-concept"
VERSION = "1"


METHOD = "zero-shot"


@dataclass
class ImagePromptKit:
    """What onboarding and zero-shot rendering need beside the MM-DiT: its DynaIP adapter (installed on the
    transformer's joint blocks) and the vision tower the adapter reads, with the tower's preprocessing."""

    adapter: DynaIPAdapter
    vision: torch.nn.Module  # a transformers CLIPVisionModel
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.adapter, self.vision)

    def fingerprint(self) -> str:
        """The adapter's and the vision tower's weights: what a concept's tokens depend on beside the base."""
        digest = hashlib.sha256(adapter_fingerprint(self.adapter).encode())
        for name, tensor in sorted(self.vision.state_dict().items()):
            if not name.endswith("position_ids"):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]


def with_kit_fingerprint(base_fingerprint: str, kit: ImagePromptKit) -> str:
    """The identity of an MM-DiT that carries a kit: its own weights' and the kit's."""
    return hashlib.sha256(f"{base_fingerprint}+{kit.fingerprint()}".encode()).hexdigest()[:32]


@dataclass
class ZeroShotConcept:
    name: str
    superclass: str  # the word that stands for the product in prompts (its placeholder's text)
    level_tokens: torch.Tensor  # (R, L, K, W)
    router_weights: torch.Tensor  # (R, L)
    base_fingerprint: str
    adapter_fingerprint: str
    token: str = ""  # what prompts name the product by ("<dotted-star>"); "" : "<name>"
    metadata: dict[str, Any] = field(default_factory=dict)  # onboarding facts and user fields (name, key)
    method: str = METHOD

    def __post_init__(self) -> None:
        self.token = self.token or f"<{self.name}>"

    @property
    def references(self) -> int:
        return int(self.level_tokens.shape[0])

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
            "method": METHOD,
            "name": self.name,
            "token": self.token,
            "superclass": self.superclass,
            "base_fingerprint": self.base_fingerprint,
            "adapter_fingerprint": self.adapter_fingerprint,
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        return seal(tensors, metadata)


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
        label = image_label(image, index)
        if picture.mode in ("RGBA", "P", "PA"):  # color with (possibly) transparency: over white, as training
            picture = over_white(picture)
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
        name,
        superclass,
        level_tokens.float().cpu(),
        weights.float().cpu(),
        base_fingerprint,
        adapter_fingerprint(adapter),
    )


def kit_of(base: Any, product: str) -> ImagePromptKit:
    """The base's image-prompt kit; an error naming the product and the fix when the base cannot render a
    zero-shot product (a UNet base, or an MM-DiT without a DynaIP adapter)."""
    if getattr(base, "architecture", None) != "mmdit":
        raise BaseModelError(
            f"product {product!r}: method zero-shot renders on an MM-DiT base with a DynaIP adapter, and "
            f"{base.source!r} is a UNet base: give zero-shot products an MM-DiT base (zero_shot.base_model: "
            "toy-mmdit), or train the product with perfusion or residuals"
        )
    kit: ImagePromptKit | None = base.image_prompt
    if kit is None:
        raise BaseModelError(
            f"product {product!r}: base {base.source!r} has no DynaIP adapter. {base.image_prompt_hint}"
        )
    return kit


def onboard_concept(
    base: Any,
    images: list[ImageInput],
    token: str,
    superclass: str,
    config: Any = None,
    *,
    masks: list[ImageInput] | None = None,
    covariance: Any = None,
    on_step: Callable[[Any], None] | None = None,
) -> ZeroShotConcept:
    """The zero-shot method's "training" (perfusion.methods' trainer signature): one vision pass over the
    product's photos on `base`'s kit. `config`, `covariance` and `on_step` are unused (nothing is optimised);
    masks are refused: the adapter reads whole photos. The product is named in errors and the file's header by
    its token without brackets (the pipeline also records the manifest's name in metadata["name"])."""
    name = token.strip("<>")
    if masks:
        raise TrainingError(f"product {name!r}: method zero-shot reads whole reference photos; remove its masks")
    kit = kit_of(base, name)
    pixels = reference_pixels(images, name, kit.image_size, kit.mean, kit.std)
    device = next(kit.vision.parameters()).device
    dtype = next(kit.vision.parameters()).dtype
    concept = onboard(name, superclass, pixels.to(device, dtype), kit.adapter, kit.vision, base.fingerprint)
    concept.token = token
    concept.metadata["references"] = concept.references
    return concept


def load_concept_for(data: bytes, base: Any = None, *, name: str | None = None) -> ZeroShotConcept:
    """perfusion.methods' loader: the file, checked against `base` (its architecture and its kit) if given."""
    label = name or "<zero-shot concept bytes>"
    if base is None:
        return load_zero_shot_concept(data, name=name)
    if getattr(base, "architecture", None) != "mmdit":
        raise ConceptFileError(
            f"{label}: a zero-shot concept renders on the MM-DiT base it was onboarded for; {base.source!r} is a "
            "UNet base (render it in a job on its zero-shot base, or train the product with perfusion)"
        )
    # The base's fingerprint covers its kit (with_kit_fingerprint): checking it checks the adapter too, without
    # hashing the adapter's weights again for every file.
    return load_zero_shot_concept(data, base.fingerprint, name=name)


def load_zero_shot_concept(
    data: bytes, base_fingerprint: str | None = None, adapter: DynaIPAdapter | None = None, *, name: str | None = None
) -> ZeroShotConcept:
    """Read a zero-shot concept file; ConceptFileError naming it when it is not one, is corrupt, or belongs to
    another base or adapter."""
    label = name or "<zero-shot concept bytes>"
    metadata = read_metadata(data, label, "zero-shot concept file")
    if metadata.get("format") != FORMAT:
        raise ConceptFileError(f"{label}: not a zero-shot concept file (format={metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ConceptFileError(f"{label}: zero-shot concept version {metadata.get('version')!r}; this reads {VERSION}")
    tensors = float_tensors(data, label)
    refuse_unknown_tensors(tensors, {"level_tokens", "router_weights"}, label)
    tokens, weights = tensors.get("level_tokens"), tensors.get("router_weights")
    if tokens is None or weights is None or tokens.dim() != 4 or weights.shape != tokens.shape[:2]:
        raise ConceptFileError(f"{label}: level_tokens (R, L, K, W) and router_weights (R, L) expected")
    if not (torch.isfinite(tokens).all() and torch.isfinite(weights).all()):
        raise ConceptFileError(f"{label}: the file holds NaN or infinite values; onboard the product again")
    if base_fingerprint is not None and metadata.get("base_fingerprint") != base_fingerprint:
        raise ConceptFileError(
            f"{label}: onboarded for another base or adapter (fingerprint {metadata.get('base_fingerprint')}, this "
            f"base {base_fingerprint}); a zero-shot product renders only on the MM-DiT base and adapter it was "
            "onboarded with: onboard it again"
        )
    if adapter is not None and metadata.get("adapter_fingerprint") != adapter_fingerprint(adapter):
        raise ConceptFileError(f"{label}: onboarded with another DynaIP adapter; onboard the product again")
    try:
        extra = json.loads(metadata.get("metadata", "{}"))
    except json.JSONDecodeError as error:
        raise ConceptFileError(f"{label}: its metadata is malformed ({error}); onboard the product again") from error
    return ZeroShotConcept(
        metadata.get("name", label),
        metadata.get("superclass", ""),
        tokens,
        weights,
        metadata.get("base_fingerprint", ""),
        metadata.get("adapter_fingerprint", ""),
        token=metadata.get("token", ""),
        metadata=extra,
    )


def image_prompt_call(
    rows: Sequence[Sequence[ZeroShotConcept]],
    guided: bool,
    weights: torch.Tensor | None = None,
    positions: Sequence[Sequence[int]] | None = None,
) -> ImagePromptCall:
    """The injection for one batch of prompts at inference (image stream only): each row's products (none,
    one or several) with, for rows of several, each one's placeholder position in the text sequence
    (`positions`, dynaip.py's routing). Rows' prompts of different lengths are padded and masked; with
    guidance the batch is [unconditional; conditional] (mmdit.MMDiTPipeline.sample) and the unconditional
    half gets none."""
    several = any(len(products) > 1 for products in rows)
    if several and positions is None:
        raise ValueError("rows with several products need each product's placeholder position")
    prompts = [[concept.image_prompt(weights) for concept in products] for products in rows]
    width = next((p.shape[-1] for row in prompts for p in row), 1)
    longest = max((sum(len(p) for p in row) for row in prompts), default=1) or 1
    products = max((len(row) for row in rows), default=1) or 1
    tokens = torch.zeros(len(rows), longest, width)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    owner = torch.full((len(rows), longest), -1, dtype=torch.long)
    places = torch.full((len(rows), products), -1, dtype=torch.long)
    mask[:, 0] = True  # a row with no product attends to one zero token, gated off by `present`
    for index, row in enumerate(prompts):
        start = 0
        for product, prompt in enumerate(row):
            tokens[index, start : start + len(prompt)] = prompt
            mask[index, start : start + len(prompt)] = True
            owner[index, start : start + len(prompt)] = product
            start += len(prompt)
        if positions is not None:
            places[index, : len(positions[index])] = torch.tensor(list(positions[index]), dtype=torch.long)
    present = torch.tensor([bool(row) for row in prompts])
    if guided:
        tokens, mask, owner, places = (torch.cat([x, x]) for x in (tokens, mask, owner, places))
        present = torch.cat([torch.zeros_like(present), present])
    if not several:
        return ImagePromptCall(tokens, present, text_stream=False, token_mask=mask)
    return ImagePromptCall(
        tokens, present, text_stream=False, token_mask=mask, token_product=owner, product_positions=places
    )
