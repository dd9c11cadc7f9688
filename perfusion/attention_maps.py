"""Where each prompt token draws a render's cross-attention: one map per (request, prompt position).

    maps = CrossAttentionMaps(grid=16)
    renderer.render_arrays(requests, settings, attention_maps=maps)
    maps.of(0)                      # (m, 16, 16): request 0's attention to each of its m prompt positions

Recorded from the same forward passes that render the images (PerfusionCall.record_attention): at every
cross-attention layer and denoising step, the probabilities softmax(Q K^T / sqrt(d)) of each image position
over the prompt positions, averaged over heads, with the concepts' edits applied to K. Each layer's map is
resized to one grid (bilinear) and the layers and steps are averaged with equal weight. Only the conditional
rows are kept (classifier-free guidance also runs the negative prompt). A diagnostic: it costs one extra
QK^T and softmax a layer, and the images are the same as without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class CrossAttentionMaps:
    def __init__(self, grid: int = 16) -> None:
        self.grid = grid
        self._sums: dict[int, torch.Tensor] = {}  # request index -> (m, grid, grid)
        self._counts: dict[int, int] = {}
        self._first, self._rows, self._guided = 0, 0, False

    def begin_batch(self, first_request: int, rows: int, guided: bool) -> None:
        """The next forward passes render requests first_request .. first_request + rows - 1."""
        self._first, self._rows, self._guided = first_request, rows, guided

    def __call__(self, layer: str, probabilities: torch.Tensor) -> None:
        """One layer's (b, n, m) probabilities; with guidance b = 2 x rows, negative rows first."""
        conditional = probabilities[self._rows :] if self._guided else probabilities  # (rows, n, m)
        rows, positions, prompt_length = conditional.shape
        side = math.isqrt(positions)
        if side * side != positions:
            raise ValueError(f"{layer}: {positions} image positions are not a square map")
        maps = conditional.transpose(1, 2).reshape(rows * prompt_length, 1, side, side).float()
        maps = F.interpolate(maps, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        maps = maps.reshape(rows, prompt_length, self.grid, self.grid).cpu()
        for row in range(rows):
            index = self._first + row
            self._sums[index] = self._sums[index] + maps[row] if index in self._sums else maps[row].clone()
            self._counts[index] = self._counts.get(index, 0) + 1

    def of(self, request: int) -> torch.Tensor:
        """(m, grid, grid): request `request`'s mean attention to each prompt position (each map's image
        positions sum to grid^2 x the position's mean share)."""
        if request not in self._sums:
            raise KeyError(f"no attention recorded for request {request}")
        return self._sums[request] / self._counts[request]
