"""The uncentered second moment C of text-encoder outputs, and its inverse (PERFUSION.md, "The covariance").

C = sum over prompts and real tokens (BOS .. EOS, never padding) of e e^T, divided by the token count
(the scale cancels in s(e) and in the projection). Accumulated in float64, inverted in float64 after a
tiny ridge (eps * mean eigenvalue * I). One C per text encoder, so it is keyed by the base fingerprint
and stored once, never inside concept files. On disk we keep C itself (safetensors, float64) and invert
at load: a (d x d) inverse costs milliseconds and the ridge stays a load-time choice.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from perfusion.errors import CovarianceError
from perfusion.models import BaseModel

DEFAULT_RIDGE = 1e-6


@dataclass(frozen=True)
class Covariance:
    second_moment: torch.Tensor  # C (d, d) float64
    c_inv: torch.Tensor  # C^-1 (d, d) float64, ridge included
    cholesky: torch.Tensor  # L (d, d) float64, lower-triangular, C^-1 = L L^T
    fingerprint: str  # base model it belongs to
    token_count: int
    ridge: float

    @classmethod
    def from_second_moment(
        cls, second_moment: torch.Tensor, fingerprint: str, token_count: int, ridge: float = DEFAULT_RIDGE
    ) -> Covariance:
        moment = second_moment.to(torch.float64)
        dim = moment.shape[0]
        regularised = moment + ridge * (torch.trace(moment) / dim) * torch.eye(dim, dtype=torch.float64)
        try:
            c_inv = torch.cholesky_inverse(torch.linalg.cholesky(regularised))
            c_inv = (c_inv + c_inv.T) / 2  # exact symmetry for the Cholesky below
            cholesky = torch.linalg.cholesky(c_inv)
        except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
            raise CovarianceError(
                f"the covariance (d={dim}, {token_count} tokens) is not positive definite: {error}. "
                "Use more prompts, or a larger ridge."
            ) from error
        return cls(moment, c_inv, cholesky, fingerprint, token_count, ridge)

    def condition_number(self) -> float:
        eigenvalues = torch.linalg.eigvalsh(self.second_moment)
        return float(eigenvalues.max() / eigenvalues.min().clamp_min(1e-300))


@torch.no_grad()
def estimate_covariance(
    base: BaseModel,
    prompts: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    ridge: float = DEFAULT_RIDGE,
    on_progress: Callable[[int, int], None] | None = None,
) -> Covariance:
    """C from `prompts` (default: the base model's own captions, base.captions())."""
    prompts = list(prompts) if prompts is not None else base.captions()
    text_encoder = base.text_encoder
    moment, count = second_moment(
        lambda ids: text_encoder(ids.to(text_encoder.device))[0],
        base.tokenizer,
        prompts,
        batch_size=batch_size,
        on_progress=on_progress,
    )
    return Covariance.from_second_moment(moment, base.fingerprint, count, ridge)


@torch.no_grad()
def second_moment(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """(C (d, d) float64, token count): the mean of e e^T over the real tokens (BOS .. EOS, never padding) of
    `prompts`; `encode` maps input_ids (b, m) to per-position states (b, m, d)."""
    if not prompts:
        raise CovarianceError("no prompts to estimate the covariance from: pass at least one caption")
    moment = torch.zeros((), dtype=torch.float64)  # broadcasts to (d, d) at the first batch
    count = 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        encodings = encode(batch.input_ids)  # (b, m, d)
        real = batch.attention_mask.bool().to(encodings.device)  # (b, m): BOS..EOS, not padding
        tokens = encodings[real].to(torch.float64).cpu()  # (n, d)
        moment = moment + tokens.T @ tokens
        count += tokens.shape[0]
        if on_progress is not None:
            on_progress(min(start + batch_size, len(prompts)), len(prompts))
    return moment / count, count


def covariance_to_bytes(covariance: Covariance) -> bytes:
    """The covariance file's bytes (safetensors): C in float64 and the base fingerprint it belongs to."""
    return save(
        {"second_moment": covariance.second_moment.contiguous()},
        metadata={
            "format": "perfusion-covariance",
            "fingerprint": covariance.fingerprint,
            "token_count": str(covariance.token_count),
        },
    )


def covariance_from_bytes(
    data: bytes, expected_fingerprint: str | None = None, ridge: float = DEFAULT_RIDGE, label: str = "covariance"
) -> Covariance:
    """Parse covariance bytes (from a file or an object store); CovarianceError naming `label` if unusable."""
    try:
        tensors = load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, struct.error) as error:  # json errors are ValueErrors
        raise CovarianceError(f"{label} is not a readable covariance file: {error}") from error
    if metadata.get("format") != "perfusion-covariance" or "second_moment" not in tensors:
        raise CovarianceError(f"{label} is not a perfusion covariance file (no 'second_moment' tensor)")
    fingerprint = metadata.get("fingerprint", "")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise CovarianceError(
            f"{label} belongs to base model {fingerprint}, not {expected_fingerprint}: estimate the covariance "
            "of this base model instead (estimate_covariance)."
        )
    return Covariance.from_second_moment(
        tensors["second_moment"], fingerprint, int(metadata.get("token_count", "0")), ridge
    )


def save_covariance(covariance: Covariance, path: str | os.PathLike[str]) -> None:
    with open(path, "wb") as handle:
        handle.write(covariance_to_bytes(covariance))


def load_covariance(
    path: str | os.PathLike[str], expected_fingerprint: str | None = None, ridge: float = DEFAULT_RIDGE
) -> Covariance:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CovarianceError(f"{path} is not a readable covariance file: {error}") from error
    return covariance_from_bytes(data, expected_fingerprint, ridge, label=str(path))


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def cached_covariance(
    base: BaseModel,
    directory: str | os.PathLike[str],
    prompts: Sequence[str] | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> Covariance:
    """The covariance of `base`, keyed by its fingerprint: load `{directory}/{fingerprint}.safetensors`,
    or estimate it once and save it there (written to a temporary name, then renamed: never half a file)."""
    folder = Path(directory)
    path = folder / f"{base.fingerprint}.safetensors"
    if path.is_file():
        return load_covariance(path, expected_fingerprint=base.fingerprint)
    covariance = estimate_covariance(base, prompts, on_progress=on_progress)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_covariance(covariance, partial)
    os.replace(partial, path)
    return covariance
