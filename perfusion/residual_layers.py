"""Residual concepts applied inside one UNet pass, per batch row, with localized attention-guided sampling.

Every transformer block's `proj_out` gets a forward hook (weights and state dict untouched) that adds

    out_i = W_i x + M_i * (dW_i x)          dW_i = A_i B_i of the row's residual concept(s)  (RESIDUALS.md)

for each batch row's own concepts: the low-rank products run batched over rows and slots, as multi-LoRA
servers do, so one pass serves any mix of concepts and no weights are ever merged. M_i is LAG's mask:

    A_C = sum over prompt positions j in C of the block's cross-attention probabilities A[:, j]
          (head-averaged; C: the concept token and the macro-class word after it)    (b, n) per slot
    M_i = 1 where A_C >= median(A_C) over the image's n positions, else 0            (torch's lower median)

The block's attn2 processor (perfusion/attention.py) hands its probabilities to `ResidualCall.observe`
before proj_out runs; a block with several attn2 layers (SDXL) averages them. With classifier-free guidance
the conditional row's mask serves its negative row too (`mask_rows`). LAG off: M = 1 everywhere.

Per-call state travels in `cross_attention_kwargs={"residuals": ResidualCall}`; without it the hooks return
the base projection exactly. The Transformer2DModel's forward pre-hook hands the call to its proj_out hook,
because diffusers passes cross_attention_kwargs to the block, not to proj_out.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from perfusion.errors import RenderError
from perfusion.residuals import ResidualConcept, transformer_blocks

BLOCK_SEPARATOR = ".transformer_blocks."  # attn2 "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@dataclass
class ResidualCall:
    """State of one UNet forward (reused across a render's denoising steps): each batch row's residual
    concepts, in the UNet's batch order (with guidance [negative rows, positive rows])."""

    concepts: list[ResidualConcept]  # the distinct concepts of the call
    slots: torch.Tensor  # (b, j) index into `concepts`; padded slots point at 0 and are inactive
    active: torch.Tensor  # (b, j) 1.0 for a real slot, 0.0 for padding
    # (b, m, j): 1 at the prompt positions of slot j's token and its macro class (LAG's C); None: LAG off
    token_masks: torch.Tensor | None = None
    mask_rows: torch.Tensor | None = None  # (b,) the row whose attention map gives row b's mask
    _maps: dict[str, list[Any]] = field(default_factory=dict, repr=False)  # block -> [sum (b, n, j), count]
    _tables: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.slots.shape[0])

    @property
    def localized(self) -> bool:
        return self.token_masks is not None

    @classmethod
    def build(
        cls,
        rows: Sequence[Sequence[ResidualConcept]],
        *,
        prompt_ids: torch.Tensor | None = None,
        token_phrases: Mapping[str, tuple[int, list[int]]] | None = None,
        mask_rows: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> ResidualCall:
        """rows[b]: the residual concepts of UNet batch row b. LAG needs prompt_ids (b, m) and token_phrases
        (concept token -> (its token id, its macro class's token ids)); without them the residuals apply at
        every image position. mask_rows (b,): whose map serves each row (default: its own)."""
        concepts: list[ResidualConcept] = []
        index: dict[int, int] = {}
        for row in rows:
            for concept in row:
                if id(concept) not in index:
                    index[id(concept)] = len(concepts)
                    concepts.append(concept)
        width = max((len(row) for row in rows), default=0)
        slots = torch.zeros(len(rows), width, dtype=torch.long)
        active = torch.zeros(len(rows), width)
        for b, row in enumerate(rows):
            slots[b, : len(row)] = torch.tensor([index[id(c)] for c in row], dtype=torch.long)
            active[b, : len(row)] = 1.0
        token_masks = None
        if prompt_ids is not None:
            if token_phrases is None:
                raise RenderError("localized residuals need each concept's token and macro-class ids")
            token_masks = torch.zeros(len(rows), prompt_ids.shape[1], width)
            for b, row in enumerate(rows):
                for j, concept in enumerate(row):
                    token_masks[b, :, j] = concept_positions(prompt_ids[b], *token_phrases[concept.token])
            token_masks = token_masks.to(device)
            mask_rows = (mask_rows if mask_rows is not None else torch.arange(len(rows))).to(device)
        return cls(concepts, slots.to(device), active.to(device), token_masks, mask_rows)

    def begin_block(self, block: str) -> None:
        self._maps.pop(block, None)

    def observe(self, layer_name: str, probabilities: torch.Tensor) -> None:
        """Accumulate LAG's A_C from an attn2 layer's probabilities (b, n, m), head-averaged."""
        if self.token_masks is None or not self.concepts:
            return
        block = layer_name.split(BLOCK_SEPARATOR)[0]
        drawn = torch.bmm(probabilities.float(), self.token_masks)  # (b, n, j)
        entry = self._maps.get(block)
        if entry is None:
            self._maps[block] = [drawn, 1]
        else:
            entry[0], entry[1] = entry[0] + drawn, entry[1] + 1

    def masks(self, block: str, positions: int) -> torch.Tensor:
        """M (b, n, j) for `block`: 1 where a slot's A_C reaches its per-image median; 1 everywhere with LAG off."""
        if self.token_masks is None:
            return torch.ones(self.batch_size, positions, self.slots.shape[1], device=self.slots.device)
        entry = self._maps.get(block)
        if entry is None:
            raise RenderError(
                f"{block}: localized residuals found no cross-attention map (is attn2 a Perfusion processor?)"
            )
        drawn = (entry[0] / entry[1])[self.mask_rows]  # (b, n, j), each row its conditional row's map
        median = drawn.median(dim=1, keepdim=True).values
        return (drawn >= median).float()

    def delta(self, block: str, x: torch.Tensor) -> torch.Tensor:
        """sum over the row's slots of M * (A (B x)): (b, n, out) for x (b, n, in)."""
        up, down = self._factors(block, x.dtype)  # (b, j, out, r), (b, j, r, in)
        weights = self.masks(block, x.shape[1]) * self.active[:, None, :]  # (b, n, j)
        low = torch.einsum("bnc,bjrc->bjnr", x, down) * weights.permute(0, 2, 1)[..., None].to(x.dtype)
        return torch.einsum("bjnr,bjor->bno", low, up)

    def _factors(self, block: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The row slots' A and B, gathered from per-concept tables zero-padded to the call's largest rank (a
        padded rank adds exact zeros). Cached for renders; rebuilt every forward while training (A, B learn)."""
        key = (block, dtype)
        if key in self._tables:
            return self._tables[key]
        rank = max(c.up[block].shape[1] for c in self.concepts)
        ups = [torch.nn.functional.pad(c.up[block], (0, rank - c.up[block].shape[1])) for c in self.concepts]
        downs = [
            torch.nn.functional.pad(c.down[block], (0, 0, 0, rank - c.down[block].shape[0])) for c in self.concepts
        ]
        device = self.slots.device
        factors = (
            torch.stack(ups).to(device, dtype)[self.slots],
            torch.stack(downs).to(device, dtype)[self.slots],
        )
        if not torch.is_grad_enabled():
            self._tables[key] = factors
        return factors


def concept_positions(ids: torch.Tensor, token_id: int, phrase: Sequence[int]) -> torch.Tensor:
    """(m,) 1.0 at every position of `token_id` in ids (m,) and at the macro-class phrase right after each."""
    found = torch.zeros(len(ids))
    values = ids.tolist()
    for p, value in enumerate(values):
        if value != token_id:
            continue
        found[p] = 1.0
        if values[p + 1 : p + 1 + len(phrase)] == list(phrase):
            found[p + 1 : p + 1 + len(phrase)] = 1.0
    return found


class _BlockHooks:
    """The hooks of one transformer block: its forward pre-hook picks up the call, proj_out's hook applies it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.call: ResidualCall | None = None

    def enter(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        call = (kwargs.get("cross_attention_kwargs") or {}).get("residuals")
        self.call = call if call is not None and call.concepts else None
        if self.call is not None:
            self.call.begin_block(self.name)

    def leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.call = None

    def project(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call is None:
            return output
        x = args[0]
        if call.batch_size != x.shape[0]:
            raise RenderError(
                f"the residual call describes {call.batch_size} rows but the UNet batch has {x.shape[0]}; build "
                "the call for the batch the UNet sees (guidance doubles it)"
            )
        if x.ndim == 4:  # 1x1 conv (SD1.x): (b, c, h, w), positions in the order attn2 saw them
            b, _, h, w = x.shape
            delta = call.delta(self.name, x.flatten(2).transpose(1, 2))  # (b, hw, out)
            return output + delta.transpose(1, 2).reshape(b, -1, h, w).to(output.dtype)
        return output + call.delta(self.name, x).to(output.dtype)  # linear (SD2.x): (b, n, c)


def install_residual_hooks(unet: torch.nn.Module) -> list[str]:
    """Hook every transformer block's proj_out (idempotent); returns the block names."""
    blocks = transformer_blocks(unet)
    if unet not in _HOOKED:
        for name, block in blocks.items():
            hooks = _BlockHooks(name)
            block.register_forward_pre_hook(hooks.enter, with_kwargs=True)
            block.register_forward_hook(hooks.leave)
            block.proj_out.register_forward_hook(hooks.project)
        _HOOKED.add(unet)
    return list(blocks)


_HOOKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # UNets whose blocks carry the hooks
