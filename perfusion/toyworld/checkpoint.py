"""Resumable training checkpoints for the toy pretraining runs (the toy CLIP and the toy UNet).

One safetensors file (never pickle) holds the model tensors the caller names, the AdamW slots as
`opt.{index}.{slot}`, and torch's RNG state; its metadata holds the step, the wall-clock time spent, the
Python RNG state, the optimizer's param groups and whatever the caller adds (a recipe to check on resume).
It is written to a `.partial` file first and renamed, so a run killed mid-save keeps its last checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]  # the caller's tensors, as saved (optimizer and RNG entries removed)
    metadata: dict[str, str]
    step: int
    elapsed: float  # seconds of training before this checkpoint
    rng: random.Random


def save_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    rng: random.Random,
    metadata: dict[str, str] | None = None,
) -> None:
    entries = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for slot, value in slots.items():  # 0-dim tensors (Adam's step) are stored as shape (1,)
            entries[f"opt.{index}.{slot}"] = value.detach().cpu().reshape(-1 if value.ndim == 0 else value.shape)
    entries["torch_rng"] = torch.get_rng_state()
    info = {
        "step": str(step),
        "elapsed": str(elapsed),
        "python_rng": json.dumps(rng.getstate()),
        "param_groups": json.dumps(state["param_groups"]),
        **(metadata or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in entries.items()}, str(partial), metadata=info)
    partial.replace(path)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Restore the optimizer and torch's RNG from `path`; the caller loads its models from `tensors`."""
    metadata = read_metadata(path)
    tensors = load_file(str(path))
    state: dict[str, object] = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # state indices, in order
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith("opt.")]:
        _, index, slot = key.split(".")
        shape = () if slot == "step" else parameters[int(index)].shape
        slots.setdefault(int(index), {})[slot] = tensors.pop(key).reshape(shape)
    state["state"] = slots
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors.pop("torch_rng"))
    rng = random.Random()
    python_state = json.loads(metadata["python_rng"])
    rng.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    return Checkpoint(tensors, metadata, int(metadata["step"]), float(metadata["elapsed"]), rng)
