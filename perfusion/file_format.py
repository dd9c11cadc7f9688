"""The container every concept file shares, whatever its method: safetensors, float tensors, and a seal.

    [8-byte little-endian header size][JSON header: tensor offsets + __metadata__][tensor bytes]

- `seal(tensors, metadata)` writes the file with `payload_sha256`, the sha256 of the tensor bytes, in its
  metadata, so a file read without its index row (a leftover a killed run wrote) proves it is whole.
- `read_metadata(data, label, kind)` reads the header: ConceptFileError naming the file when it is empty,
  cut short (the header promises more bytes than there are), not safetensors at all (pickle is never
  loaded), or its tensor bytes fail the seal. Files written before the seal have none and are read as they are.
- `float_tensors(data, label)` reads the tensors as float32, refusing any other dtype (an int8 or bool
  tensor cast to float is a different concept); `refuse_unknown_tensors` refuses a name the format does
  not define.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from perfusion.errors import ConceptFileError
from perfusion.methods import header_metadata, not_safetensors_reason

SEAL = "payload_sha256"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def seal(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of `tensors` with `metadata` plus the seal over the tensor bytes. The tensor bytes
    do not depend on the metadata (safetensors orders them by dtype and name), so one save measures them.
    The header's keys are written sorted: the same tensors and metadata give the same bytes."""
    unsealed = save_tensors(tensors, metadata=metadata)
    sealed = save_tensors(tensors, metadata=metadata | {SEAL: hashlib.sha256(_payload(unsealed)).hexdigest()})
    assert _payload(sealed) == _payload(unsealed)
    return _canonical_header(sealed)


def _canonical_header(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted. safetensors writes them in hash-map order, which
    differs from one save to the next; the keys only name things (offsets are explicit), so the order is
    free. Same size: the same compact JSON, padded with spaces to the original length as safetensors pads."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= size, "a sorted header is never longer than the one safetensors wrote"
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


def _payload(data: bytes) -> bytes:
    (size,) = struct.unpack("<Q", data[:8])
    return data[8 + size :]


def read_metadata(data: bytes, label: str, kind: str) -> dict[str, str]:
    """The header's metadata of a file that claims to be a `kind` ("concept file"); ConceptFileError for an
    empty, cut-short, non-safetensors or unsealed-and-damaged file."""
    metadata = header_metadata(data)
    if metadata is None:
        raise ConceptFileError(f"{label}: {not_safetensors_reason(data, kind)}")
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])  # parses: header_metadata read it
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if len(data) - 8 - size < end:
        raise ConceptFileError(
            f"{label}: the file is cut short ({len(data)} bytes of {8 + size + end}): the write was interrupted or "
            f"the copy is incomplete; retrain the concept or copy the {kind} again"
        )
    expected = metadata.get(SEAL)
    if expected is not None and hashlib.sha256(_payload(data)).hexdigest() != expected:
        raise ConceptFileError(
            f"{label}: its tensor bytes fail the file's own checksum ({SEAL}): the file is damaged; "
            "retrain the concept or copy the file again"
        )
    return metadata


def float_tensors(data: bytes, label: str) -> dict[str, torch.Tensor]:
    """The file's tensors as float32. ConceptFileError for a corrupt payload or a tensor that is not floating
    point (float16, bfloat16, float32). Which names a format holds is its loader's to check (`unknown_tensors`)."""
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as error:
        raise ConceptFileError(f"{label}: the tensor data is corrupt ({error}); re-export the concept") from error
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise ConceptFileError(
                f"{label}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; concept files hold "
                "float16, bfloat16 or float32 tensors only: the file was not written by perfusion-batch"
            )
    return {name: tensor.float() for name, tensor in tensors.items()}


def refuse_unknown_tensors(tensors: dict[str, torch.Tensor], expected: set[str], label: str) -> None:
    """ConceptFileError for tensors the format does not define (ignoring them would render a file that is not
    what it says)."""
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ConceptFileError(
            f"{label}: unknown tensor(s) {unknown[:3]} for this file's format and metadata; the file was altered "
            "or written by another tool: retrain or re-export the concept"
        )
