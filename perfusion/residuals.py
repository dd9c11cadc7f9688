"""A Personalized Residuals concept and its file format (Ham et al., CVPR 2024; RESIDUALS.md).

A residual concept is a low-rank update of the output projection `proj_out` of every transformer block of
the UNet (diffusers' Transformer2DModel): for block i with m_i channels,

    proj_out_i(x) = W_i x + dW_i x,     dW_i = A_i B_i,   A_i (m_i, r_i), B_i (r_i, m_i),   r_i = ceil(0.05 m_i)

plus the concept token's input embedding (kept at its initialisation unless training it was asked for).
How the update is applied, per batch row and, with localized attention-guided sampling, per image position,
is perfusion/residual_layers.py.

A file holds, per RESIDUALS.md:
    tensors   embedding          (dim_embed,)   the concept token's input embedding row
              up/<block>         (m_i, r_i)     A_i
              down/<block>       (r_i, m_i)     B_i
    metadata  format, format_version, method "residuals", token, superclass (the macro class), fingerprint
              of the base model and of its proj_out weights (`blocks_fingerprint`: a residual is a delta of
              those weights, which the base fingerprint does not cover), block names, ranks, training config
              and loss summary (JSON strings)
fp16 by default: ~2.5 MB for an SD1.5 concept (1.24M parameters). Loading validates everything and raises
ConceptFileError naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from perfusion.concept import read_concept_source
from perfusion.config import TOKEN_PATTERN
from perfusion.errors import ConceptFileError, ConceptTokenError
from perfusion.file_format import float_tensors, read_metadata, refuse_unknown_tensors, seal
from perfusion.methods import METHODS
from perfusion.models import BaseModel
from perfusion.tokens import validate_token

METHOD = "residuals"
FORMAT = METHODS[METHOD].file_format
FORMAT_VERSION = 1
UP_PREFIX, DOWN_PREFIX = "up/", "down/"


@dataclass
class ResidualConcept:
    token: str
    superclass: str  # the macro class: trained in "a photo of a <token> <superclass>", part of the LAG mask
    embedding: torch.Tensor  # (dim_embed,)
    up: dict[str, torch.Tensor]  # block name -> A (m, r)
    down: dict[str, torch.Tensor]  # block name -> B (r, m)
    fingerprint: str  # the base model's (perfusion.models.fingerprint), as every concept records
    blocks_fingerprint: str  # its proj_out weights' (blocks_fingerprint below)
    metadata: dict[str, Any] = field(default_factory=dict)  # training config, loss summary
    method: str = METHOD

    @property
    def block_names(self) -> list[str]:
        return list(self.up)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(a.shape[1]) for name, a in self.up.items()}

    @property
    def parameters(self) -> int:
        """Residual parameters (the embedding row not counted)."""
        return sum(a.numel() + self.down[name].numel() for name, a in self.up.items())

    def to_bytes(self, dtype: torch.dtype = torch.float16) -> bytes:
        """Serialise to safetensors bytes (fp16 by default, fp32 for exact round trips)."""
        if dtype not in (torch.float16, torch.float32):
            raise ValueError("concept files are stored as float16 or float32")
        tensors = {"embedding": self.embedding}
        tensors |= {UP_PREFIX + name: a for name, a in self.up.items()}
        tensors |= {DOWN_PREFIX + name: b for name, b in self.down.items()}
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "token": self.token,
            "superclass": self.superclass,
            "fingerprint": self.fingerprint,
            "blocks_fingerprint": self.blocks_fingerprint,
            "blocks": json.dumps(self.block_names),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        return seal(tensors, metadata)

    def save(self, path: str | os.PathLike[str], dtype: torch.dtype = torch.float16) -> int:
        """Write the file; returns its size in bytes."""
        data = self.to_bytes(dtype)
        with open(path, "wb") as handle:
            handle.write(data)
        return len(data)


def transformer_blocks(unet: torch.nn.Module) -> dict[str, Any]:
    """Every transformer block that has a `proj_out` (diffusers' Transformer2DModel), by module path, in UNet
    order: SD1.x has 16 (5 x 320, 5 x 640, 6 x 1280 channels)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return {name: module for name, module in unet.named_modules() if isinstance(module, Transformer2DModel)}


def projection_shape(block: Any) -> tuple[int, int]:
    """(out, in) channels of a block's proj_out: a 1x1 Conv2d (SD1.x) or a Linear (SD2.x)."""
    layer = block.proj_out
    if isinstance(layer, torch.nn.Conv2d):
        if layer.kernel_size != (1, 1):
            raise ConceptFileError(f"proj_out is a {layer.kernel_size} convolution; residuals need 1x1 or linear")
        return int(layer.out_channels), int(layer.in_channels)
    return int(layer.out_features), int(layer.in_features)


def rank_for(channels: int, fraction: float) -> int:
    """r_i = ceil(fraction x m_i) (the paper: fraction 0.05, so 320 -> 16, 640 -> 32, 1280 -> 64)."""
    return max(1, math.ceil(fraction * channels - 1e-9))


def blocks_fingerprint(unet: torch.nn.Module) -> str:
    """sha256 (first 32 hex digits) of every proj_out weight (fp16 bytes): what a residual is a delta of."""
    cached = _BLOCK_FINGERPRINTS.get(unet)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for name, block in transformer_blocks(unet).items():
        weight = block.proj_out.weight.detach().to("cpu", torch.float16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()[:32]
    _BLOCK_FINGERPRINTS[unet] = value  # frozen base weights: hashed once per loaded UNet
    return value


_BLOCK_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def load_residual_concept(
    source: str | os.PathLike[str] | bytes, base: BaseModel | None = None, *, name: str | None = None
) -> ResidualConcept:
    """Read and validate a residual concept file (a path or its bytes). With `base`, check it fits that model."""
    label, data = read_concept_source(source, name)
    metadata = _read_metadata(data, label)
    tensors = float_tensors(data, label)
    concept = _concept_from(tensors, metadata, label)
    if base is not None:
        check_residual_compatible(concept, base, label)
    return concept


def check_residual_compatible(concept: ResidualConcept, base: BaseModel, label: str | None = None) -> None:
    """Raise ConceptFileError unless `concept` was trained on `base` and every residual fits its block."""
    label = label or concept.token
    if concept.fingerprint != base.fingerprint or concept.blocks_fingerprint != blocks_fingerprint(base.unet):
        raise ConceptFileError(
            f"{label}: a residual concept trained on base model {concept.fingerprint} (proj_out "
            f"{concept.blocks_fingerprint}), but the loaded base model {base.source!r} is {base.fingerprint} "
            f"(proj_out {blocks_fingerprint(base.unet)}). Load it with the base model it was trained on, or "
            "retrain the concept on this one."
        )
    blocks = transformer_blocks(base.unet)
    if list(blocks) != concept.block_names:
        missing = sorted(set(blocks) - set(concept.block_names))
        extra = sorted(set(concept.block_names) - set(blocks))
        raise ConceptFileError(
            f"{label}: its transformer blocks do not match the base model (missing {missing[:3]}, unknown "
            f"{extra[:3]}). The file belongs to another architecture."
        )
    for name, block in blocks.items():
        out, inner = projection_shape(block)
        rank = concept.ranks[name]
        if rank > min(out, inner):
            raise ConceptFileError(
                f"{label}: the residual of {name} has rank {rank}, more than its {min(out, inner)}-channel "
                "proj_out can hold; the file is damaged or belongs to another architecture"
            )
        _expect_shape(label, UP_PREFIX + name, concept.up[name], (out, rank))
        _expect_shape(label, DOWN_PREFIX + name, concept.down[name], (rank, inner))
    embed_dim = base.text_encoder.get_input_embeddings().embedding_dim
    _expect_shape(label, "embedding", concept.embedding, (embed_dim,))
    try:
        validate_token(concept.token, base.tokenizer)
    except ConceptTokenError as error:
        raise ConceptFileError(f"{label}: {error}") from error


def _read_metadata(data: bytes, label: str) -> dict[str, str]:
    metadata = read_metadata(data, label, "concept file")
    if metadata.get("format") != FORMAT:
        raise ConceptFileError(
            f"{label}: a safetensors file, but not a residual concept (format={metadata.get('format')!r}); "
            "perfusion.load_concept_file reads a concept file of any method"
        )
    version = metadata.get("format_version", "")
    if not version.isdigit():
        raise ConceptFileError(f"{label}: format_version {version!r} is not a number; the file is damaged")
    if int(version) > FORMAT_VERSION:
        raise ConceptFileError(
            f"{label}: written in residual concept format v{version}, newer than this perfusion-batch reads "
            f"(v{FORMAT_VERSION}). Upgrade perfusion-batch to load it."
        )
    return dict(metadata)


def _concept_from(tensors: dict[str, torch.Tensor], meta: dict[str, str], label: str) -> ResidualConcept:
    try:
        blocks = json.loads(meta["blocks"])
        token, superclass = meta["token"], meta["superclass"]
        fingerprint, blocks_print = meta["fingerprint"], meta["blocks_fingerprint"]
        extra = json.loads(meta.get("metadata", "{}"))
        method = meta.get("method", METHOD)
    except (KeyError, ValueError) as error:
        raise ConceptFileError(f"{label}: metadata field {error} is missing or malformed") from error
    if method != METHOD:
        raise ConceptFileError(f"{label}: method {method!r} is not one a residual concept file holds")
    if not TOKEN_PATTERN.match(token):
        raise ConceptFileError(f"{label}: token {token!r} is not a valid concept token; the file is damaged")
    if not isinstance(blocks, list) or not blocks:
        raise ConceptFileError(f"{label}: the file names no transformer blocks; re-export it")
    required = ["embedding"] + [p + name for name in blocks for p in (UP_PREFIX, DOWN_PREFIX)]
    missing = [key for key in required if key not in tensors]
    if missing:
        raise ConceptFileError(f"{label}: missing tensor(s) {missing[:3]}; the file is incomplete, re-export it")
    refuse_unknown_tensors(tensors, set(required), label)
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ConceptFileError(f"{label}: tensor {key} has NaN or infinite values; retrain the concept")
    if tensors["embedding"].ndim != 1:
        raise ConceptFileError(f"{label}: tensor embedding has shape {tuple(tensors['embedding'].shape)}, not a vector")
    for name in blocks:
        up, down = tensors[UP_PREFIX + name], tensors[DOWN_PREFIX + name]
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ConceptFileError(
                f"{label}: the residual of {name} is up {tuple(up.shape)} x down {tuple(down.shape)}, not a "
                "low-rank product (m, r) x (r, m); the file is damaged"
            )
    return ResidualConcept(
        token=token,
        superclass=superclass,
        embedding=tensors["embedding"],
        up={name: tensors[UP_PREFIX + name] for name in blocks},
        down={name: tensors[DOWN_PREFIX + name] for name in blocks},
        fingerprint=fingerprint,
        blocks_fingerprint=blocks_print,
        metadata=extra,
    )


def _expect_shape(label: str, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ConceptFileError(
            f"{label}: tensor {key} has shape {tuple(tensor.shape)}, but the base model needs {shape}; "
            "the file belongs to another architecture"
        )
