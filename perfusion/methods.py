"""The personalization methods by name: the one seam where a method plugs into training and rendering.

A method says how a concept is trained from a few images and how its file is read back. The pipeline never
names a method's code: a training task calls `method_for(settings).train(...)`, a renderer calls
`load_concept_file(data, base)`, which reads the method from the file's own metadata, and attaches what it
gets to a `ConceptRenderer`; the concept index records `method` and `method.version` per row. Adding a
method is an entry here (its trainer, its loader, its version), its module, and what its renderer needs.

Plain Python, like perfusion/registry.py: a driver that plans never imports torch; each entry's code is
imported on first use ("module:function").
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from perfusion.errors import ConceptFileError, TrainingError
from perfusion.registry import resolve


@dataclass(frozen=True)
class Method:
    name: str  # as manifests (training.method), concept files and index rows spell it
    version: str  # part of every concept key: bump when a change alters what training produces
    trainer: str  # "module:function": (base, images, token, superclass, config, *, masks, covariance, on_step)
    loader: str  # "module:function": (data: bytes, base, *, name) -> a concept a ConceptRenderer attaches
    file_format: str  # the "format" its concept files carry in their safetensors metadata

    def train(self, *args: Any, **kwargs: Any) -> Any:
        return resolve(self.trainer)(*args, **kwargs)

    def load(self, data: bytes, base: Any = None, *, name: str | None = None) -> Any:
        return resolve(self.loader)(data, base, name=name)


_PERFUSION = {
    "trainer": "perfusion.training:train_concept",
    "loader": "perfusion.concept:load_concept",
    "file_format": "perfusion-concept",
}
METHODS: dict[str, Method] = {
    # Key-locked, gated rank-1 edits of every cross-attention layer (Tewel et al. 2023; PERFUSION.md).
    "perfusion": Method("perfusion", "perfusion-1", **_PERFUSION),
    # The embedding row alone, no layer edited: the baseline the paper compares against (same file format).
    "textual_inversion": Method("textual_inversion", "perfusion-1", **_PERFUSION),
    # Low-rank residuals on every transformer block's proj_out, applied where the concept is attended to
    # (Ham et al. 2024; RESIDUALS.md).
    "residuals": Method(
        "residuals",
        "residuals-1",
        trainer="perfusion.residual_training:train_residual_concept",
        loader="perfusion.residuals:load_residual_concept",
        file_format="residual-concept",
    ),
    # No training: the product's photos through a DynaIP image-prompt adapter of an MM-DiT base, stored as
    # per-level tokens (Dynamic Decoupling + HMoE fusion; DYNAIP.md). Its "trainer" is the onboarding pass.
    "zero-shot": Method(
        "zero-shot",
        "zero-shot-1",
        trainer="perfusion.zero_shot:onboard_concept",
        loader="perfusion.zero_shot:load_concept_for",
        file_format="zero-shot-concept",
    ),
}
ZERO_SHOT = "zero-shot"
DEFAULT_METHOD = "perfusion"


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise TrainingError(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_for(settings: Mapping[str, Any]) -> Method:
    """The method a concept's training settings (a manifest's `training:` merged, TrainConfig fields) pick."""
    return method_named(str(settings.get("method", DEFAULT_METHOD)))


def file_method(data: bytes, label: str = "<concept bytes>") -> Method:
    """The method that wrote a concept file, from its safetensors header alone (no tensors are read)."""
    metadata = header_metadata(data)
    if metadata is None:
        raise ConceptFileError(f"{label}: {not_safetensors_reason(data)}")
    by_format = [m for m in METHODS.values() if m.file_format == metadata.get("format")]
    if not by_format:
        raise ConceptFileError(
            f"{label}: not a concept file of any method this perfusion-batch knows (format="
            f"{metadata.get('format')!r}). Concept files are safetensors written by perfusion-batch; "
            "pickle formats are never loaded."
        )
    name = metadata.get("method", by_format[0].name)
    if name not in METHODS:
        raise ConceptFileError(
            f"{label}: written by method {name!r}, which this perfusion-batch does not know: upgrade it"
        )
    return METHODS[name]


def load_concept_file(data: bytes, base: Any = None, *, name: str | None = None) -> Any:
    """Read and validate a concept file of any method (with `base`: checked against that model too)."""
    return file_method(data, name or "<concept bytes>").load(data, base, name=name)


def header_metadata(data: bytes) -> dict[str, str] | None:
    """A safetensors file's __metadata__ (8-byte little-endian header length, then JSON); None for anything
    that is not safetensors."""
    if len(data) < 8:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        return None
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.get("__metadata__") or {}
    return dict(metadata) if isinstance(metadata, dict) else {}


def not_safetensors_reason(data: bytes, kind: str = "concept file") -> str:
    """Why `data` (header_metadata gave None) is no safetensors file, and the fix: empty, cut short, or other."""
    if not data:
        return f"the file is empty (0 bytes): the write was interrupted; retrain the concept or copy the {kind} again"
    # A safetensors header is JSON: '{' right after the size. A file cut inside its header starts like one.
    if data[8:9] == b"{":
        (size,) = struct.unpack("<Q", data[:8])
        return (
            f"the file is cut short ({len(data)} bytes; its header alone is {size + 8}): the write was "
            f"interrupted or the copy is incomplete; retrain the concept or copy the {kind} again"
        )
    return f"not a safetensors {kind}. Concept files are written by perfusion-batch; pickle formats are never loaded."
