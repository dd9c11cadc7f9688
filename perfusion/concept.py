"""A learned concept and its file format (safetensors; the paper's "100KB").

A concept file holds, per PERFUSION.md:
    tensors   embedding                 (dim_embed,)  the concept token's input embedding row
              target_input              (d,)          i*
              superclass_input          (d,)          i_super
              value_target/<layer>      (out,)        o*_V, one per cross-attention layer
              key_target/<layer>        (out,)        only for the trained-keys ablation (no key locking)
    metadata  format, format_version, method (perfusion.methods), token, superclass, fingerprint of the
              base model, layer names, default beta/tau, training config and loss summary (JSON strings)
The locked keys o*_K = W_K i_super are recomputed from the base model, and C^-1 lives once per base model,
so neither is stored here. fp16 by default (~30 KB for an SD1.5 concept), but i* and i_super always fp32:
the gate compares sim(e, i*) with beta, and fp16 rounding moves it by up to 0.04 near the threshold. The
container and its seal are perfusion/file_format.py's.

Loading validates everything and raises ConceptFileError naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from perfusion.config import DEFAULT_BETA, DEFAULT_TAU, TOKEN_PATTERN
from perfusion.errors import ConceptFileError, ConceptTokenError
from perfusion.file_format import float_tensors, read_metadata, refuse_unknown_tensors, seal
from perfusion.methods import METHODS
from perfusion.models import BaseModel
from perfusion.tokens import validate_token

FORMAT = METHODS["perfusion"].file_format
FORMAT_VERSION = 1
VALUE_PREFIX, KEY_PREFIX = "value_target/", "key_target/"


@dataclass
class Concept:
    token: str
    superclass: str
    embedding: torch.Tensor  # (dim_embed,)
    target_input: torch.Tensor  # i* (d,)
    superclass_input: torch.Tensor  # i_super (d,)
    value_targets: dict[str, torch.Tensor]  # layer name -> o*_V (out,)
    fingerprint: str  # base model this concept was trained on
    key_targets: dict[str, torch.Tensor] | None = None  # None: key-locked, o*_K = W_K i_super
    beta: float = DEFAULT_BETA
    tau: float = DEFAULT_TAU
    metadata: dict[str, Any] = field(default_factory=dict)  # training config, loss summary, user fields
    method: str = "perfusion"  # "textual_inversion": the embedding-only baseline (perfusion.methods)

    @property
    def layer_names(self) -> list[str]:
        return list(self.value_targets)

    @property
    def edits(self) -> bool:
        """False for an embedding-only concept (the textual-inversion baseline): no layer is edited."""
        return bool(self.value_targets)

    def to_bytes(self, dtype: torch.dtype = torch.float16) -> bytes:
        """Serialise to safetensors bytes (fp16 by default, fp32 for exact round trips; i*, i_super fp32)."""
        if dtype not in (torch.float16, torch.float32):
            raise ValueError("concept files are stored as float16 or float32")
        tensors = {
            "embedding": self.embedding,
            "target_input": self.target_input,
            "superclass_input": self.superclass_input,
        }
        tensors |= {VALUE_PREFIX + name: value for name, value in self.value_targets.items()}
        if self.key_targets is not None:
            tensors |= {KEY_PREFIX + name: key for name, key in self.key_targets.items()}
        exact = {"target_input", "superclass_input"}  # the gate's inputs (module docstring)
        tensors = {
            k: v.detach().to("cpu", torch.float32 if k in exact else dtype).contiguous() for k, v in tensors.items()
        }
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "token": self.token,
            "superclass": self.superclass,
            "fingerprint": self.fingerprint,
            "layers": json.dumps(self.layer_names),
            "key_locked": json.dumps(self.key_targets is None),
            "beta": repr(self.beta),
            "tau": repr(self.tau),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        return seal(tensors, metadata)

    def save(self, path: str | os.PathLike[str], dtype: torch.dtype = torch.float16) -> int:
        """Write the file; returns its size in bytes."""
        data = self.to_bytes(dtype)
        with open(path, "wb") as handle:
            handle.write(data)
        return len(data)


def load_concept(
    source: str | os.PathLike[str] | bytes, base: BaseModel | None = None, *, name: str | None = None
) -> Concept:
    """Read and validate a concept file (a path or its bytes). With `base`, also check it fits that model."""
    label, data = read_concept_source(source, name)
    metadata = _read_metadata(data, label)
    concept = _concept_from(float_tensors(data, label), metadata, label)
    if base is not None:
        check_compatible(concept, base, label)
    return concept


def read_concept_source(source: str | os.PathLike[str] | bytes, name: str | None) -> tuple[str, bytes]:
    """(the label errors name, the file's bytes) of a concept file given as a path or as its bytes (any method)."""
    label = name or (str(source) if not isinstance(source, bytes) else "<concept bytes>")
    if isinstance(source, bytes):
        return label, source
    try:
        with open(source, "rb") as handle:
            return label, handle.read()
    except OSError as error:
        raise ConceptFileError(f"{label}: cannot read the concept file ({error.strerror})") from error


def check_compatible(concept: Concept, base: BaseModel, label: str | None = None) -> None:
    """Raise ConceptFileError unless `concept` was trained on `base` and its shapes fit it."""
    label = label or concept.token
    if concept.fingerprint != base.fingerprint:
        raise ConceptFileError(
            f"{label}: trained on base model {concept.fingerprint}, but the loaded base model "
            f"{base.source!r} is {base.fingerprint}. Load it with the base model it was trained on, or "
            "retrain the concept on this one."
        )
    layers = base.cross_attention_layers() if concept.edits else {}
    if list(layers) != concept.layer_names:
        missing = sorted(set(layers) - set(concept.layer_names))
        extra = sorted(set(concept.layer_names) - set(layers))
        raise ConceptFileError(
            f"{label}: its cross-attention layers do not match the base model (missing {missing[:3]}, "
            f"unknown {extra[:3]}). The file belongs to another architecture."
        )
    embed_dim = base.text_encoder.get_input_embeddings().embedding_dim
    text_dim = base.unet.config.cross_attention_dim
    _expect_shape(label, "embedding", concept.embedding, (embed_dim,))
    _expect_shape(label, "target_input", concept.target_input, (text_dim,))
    _expect_shape(label, "superclass_input", concept.superclass_input, (text_dim,))
    for name, layer in layers.items():
        _expect_shape(label, VALUE_PREFIX + name, concept.value_targets[name], (layer.to_v.out_features,))
        if concept.key_targets is not None:
            _expect_shape(label, KEY_PREFIX + name, concept.key_targets[name], (layer.to_k.out_features,))
    try:
        validate_token(concept.token, base.tokenizer)
    except ConceptTokenError as error:
        raise ConceptFileError(f"{label}: {error}") from error


def _read_metadata(data: bytes, label: str) -> dict[str, str]:
    """The safetensors header's metadata, checked to be a concept file this version reads."""
    metadata = read_metadata(data, label, "concept file")
    if metadata.get("format") != FORMAT:
        raise ConceptFileError(
            f"{label}: a safetensors file, but not a Perfusion concept (format={metadata.get('format')!r})"
        )
    version = metadata.get("format_version", "")
    if not version.isdigit():
        raise ConceptFileError(f"{label}: format_version {version!r} is not a number; the file is damaged")
    if int(version) > FORMAT_VERSION:
        raise ConceptFileError(
            f"{label}: written in concept format v{version}, newer than this perfusion-batch reads "
            f"(v{FORMAT_VERSION}). Upgrade perfusion-batch to load it."
        )
    return dict(metadata)


def _concept_from(tensors: dict[str, torch.Tensor], meta: dict[str, str], label: str) -> Concept:
    try:
        layers = json.loads(meta["layers"])
        key_locked = json.loads(meta.get("key_locked", "true"))
        token, superclass, fingerprint = meta["token"], meta["superclass"], meta["fingerprint"]
        beta, tau = float(meta.get("beta", DEFAULT_BETA)), float(meta.get("tau", DEFAULT_TAU))
        extra = json.loads(meta.get("metadata", "{}"))
        method = meta.get("method", "perfusion" if layers else "textual_inversion")  # files from before the field
    except (KeyError, ValueError) as error:
        raise ConceptFileError(f"{label}: metadata field {error} is missing or malformed") from error
    if method not in METHODS or METHODS[method].file_format != FORMAT:
        raise ConceptFileError(f"{label}: method {method!r} is not one a Perfusion concept file holds")
    if not TOKEN_PATTERN.match(token):
        raise ConceptFileError(f"{label}: token {token!r} is not a valid concept token; the file is damaged")
    required = ["embedding", "target_input", "superclass_input"] + [VALUE_PREFIX + name for name in layers]
    if not key_locked:
        required += [KEY_PREFIX + name for name in layers]
    missing = [key for key in required if key not in tensors]
    if missing:
        raise ConceptFileError(f"{label}: missing tensor(s) {missing[:3]}; the file is incomplete, re-export it")
    refuse_unknown_tensors(tensors, set(required), label)
    for key, tensor in tensors.items():
        if tensor.ndim != 1:
            raise ConceptFileError(f"{label}: tensor {key} has shape {tuple(tensor.shape)}, expected a vector")
        if not bool(torch.isfinite(tensor).all()):
            raise ConceptFileError(f"{label}: tensor {key} has NaN or infinite values; retrain the concept")
    if tensors["target_input"].shape != tensors["superclass_input"].shape:
        raise ConceptFileError(f"{label}: target_input and superclass_input differ in size")
    if not (math.isfinite(beta) and math.isfinite(tau) and tau > 0):
        raise ConceptFileError(f"{label}: gate parameters beta={beta}, tau={tau} are invalid (tau must be > 0)")
    return Concept(
        token=token,
        superclass=superclass,
        embedding=tensors["embedding"],
        target_input=tensors["target_input"],
        superclass_input=tensors["superclass_input"],
        value_targets={name: tensors[VALUE_PREFIX + name] for name in layers},
        key_targets=None if key_locked else {name: tensors[KEY_PREFIX + name] for name in layers},
        fingerprint=fingerprint,
        beta=beta,
        tau=tau,
        metadata=extra,
        method=method,
    )


def _expect_shape(label: str, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ConceptFileError(
            f"{label}: tensor {key} has shape {tuple(tensor.shape)}, but the base model needs {shape}; "
            "the file belongs to another architecture"
        )
