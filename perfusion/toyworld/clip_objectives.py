"""The per-position objectives of the toy CLIP's pretraining, beside the CLIP loss (clip.py's notes say why
the per-position states need objectives of their own)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTokenizer

from perfusion.toyworld.language import GENERIC_NOUNS, MODIFIERS, PLURALS
from perfusion.toyworld.world import PALETTE, SHAPES, TEXTURES


class AttributeTargets:
    """What each noun of a caption is said to be, from the words right before it: the targets that teach the
    encoder to bind attributes to their own object. In "a red circle and a star" the state of "star" must say
    "no color stated", not "red"; in "a red star", "red". Only the adjectives contiguous before the noun count
    (the caption language puts an object's color and texture there); nothing after it is visible to a causal
    encoder. Positions that are not nouns get IGNORE."""

    IGNORE = -100

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        def token(word: str) -> int:
            return int(tokenizer.convert_tokens_to_ids(f"{word}</w>"))

        self.colors = {token(c): k for k, c in enumerate(PALETTE)}
        self.textures = {token(t): k for k, t in enumerate(TEXTURES)}
        self.nouns = {token(w) for w in (*SHAPES, *PLURALS.values(), *GENERIC_NOUNS, "background", "backdrop")}
        self.skippable = {token(w) for w in MODIFIERS} | set(self.colors) | set(self.textures)
        self.unstated_color, self.unstated_texture = len(PALETTE), len(TEXTURES)

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(color targets, texture targets), each (b, m) long."""
        colors = torch.full(input_ids.shape, self.IGNORE, dtype=torch.long)
        textures = torch.full(input_ids.shape, self.IGNORE, dtype=torch.long)
        for row, ids in enumerate(input_ids.tolist()):
            for position, token in enumerate(ids):
                if token not in self.nouns:
                    continue
                color, texture, back = self.unstated_color, self.unstated_texture, position - 1
                while back > 0 and ids[back] in self.skippable:
                    color = self.colors.get(ids[back], color)
                    texture = self.textures.get(ids[back], texture)
                    back -= 1
                colors[row, position], textures[row, position] = color, texture
        return colors, textures


class ConsistencyLoss(nn.Module):
    """Within-class spread of noun states: sum |e - p_key|^2 / sum |e - mean|^2 over the batch's nouns, where
    p_key is an EMA prototype (no gradient) of the states of the same (word, stated color, stated texture).

    Why: in the C^-1 metric of eq. 3 every direction of the corpus counts equally, so whatever context a noun's
    state carries (the words before it) dilutes s at that noun: s ~ |w|^2 / (|w|^2 + |k|^2) for a word part w and
    a context part k, both whitened. A shape word is frequent in the toy's captions (|w|^2 small) where a
    real product noun is rare among CLIP's 49k words; so here the context part must be small instead."""

    prototypes: torch.Tensor  # (keys, d) buffer
    seen: torch.Tensor  # (keys,) bool buffer

    def __init__(self, vocab_size: int, width: int, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        keys = vocab_size * (len(PALETTE) + 1) * (len(TEXTURES) + 1)
        self.register_buffer("prototypes", torch.zeros(keys, width))
        self.register_buffer("seen", torch.zeros(keys, dtype=torch.bool))

    def forward(
        self, states: torch.Tensor, input_ids: torch.Tensor, colors: torch.Tensor, textures: torch.Tensor
    ) -> torch.Tensor:
        nouns = colors != AttributeTargets.IGNORE  # (b, m)
        if nouns.sum() < 2:
            return states.sum() * 0
        picked = states[nouns]  # (n, d)
        keys = (input_ids[nouns] * (len(PALETTE) + 1) + colors[nouns]) * (len(TEXTURES) + 1) + textures[nouns]
        with torch.no_grad():  # the batch's mean state per key, folded into the prototypes
            unique, inverse = keys.unique(return_inverse=True)
            sums = torch.zeros(len(unique), picked.shape[1], device=picked.device).index_add_(
                0, inverse, picked.detach().float()
            )
            means = sums / torch.bincount(inverse, minlength=len(unique)).unsqueeze(1)
            fresh = ~self.seen[unique]
            self.prototypes[unique] = torch.where(
                fresh.unsqueeze(1), means, self.decay * self.prototypes[unique] + (1 - self.decay) * means
            )
            self.seen[unique] = True
        within = (picked.float() - self.prototypes[keys]).square().sum()
        total = (picked.float() - picked.float().mean(0)).square().sum().clamp_min(1e-8)
        return within / total
