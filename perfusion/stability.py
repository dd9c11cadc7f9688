"""Context stability of a text encoder: does a word's encoding keep its word across contexts?

Perfusion's gate (eq. 3) opens where s(e) = (i^T C^-1 e) / (i^T C^-1 i) is near 1. Key locking needs the
superclass word's encoding to score s ~ 1 against i_super wherever the word stands in a prompt, and every
other token to score s ~ 0, or the concept's edit lands on the wrong words. This module measures that for
any text encoder: for a word, i_super from a reference prompt ("a photo of a {}"), then s at the word and at
every other real token (BOS .. EOS) of prompts that change what comes before the word, and at the first
padding positions (the UNet reads those too). Nothing here trains or changes the encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Encode = Callable[[torch.Tensor], torch.Tensor]  # input_ids (b, m) -> per-position states (b, m, d)

# Contexts that vary what precedes the word, with no attribute right before it (so the word's own encoding,
# not "red" + word, is what is measured); "{}" is the word, "{other}" another word of the same kind.
CONTEXTS: tuple[str, ...] = (
    "{}",
    "{} on a white background",
    "{} on a blue background",
    "a {}",
    "the {}",
    "one {}",
    "a photo of the {}",
    "a rendering of a {}",
    "a picture of a {} on a green background",
    "a close-up photo of a {}, high quality",
    "a red {other} and a {}",
    "a {} and a blue {other}",
    "a yellow {other} next to a {}",
    "a {} next to a black {other} on a white background",
    "on a green background, a {}",
    "a white background with a {}",
    "a purple background, a {}",
    "a red background, one {}",
    "a product shot of a {} on a black background, studio lighting",
    "a high quality studio photo of a {} on a plain white background, soft light, 4k",
    "an orange {other} beside a {}",
    "two objects: a striped red {other} and a {}",
    "{} and a green {other}",
    "a {}, studio lighting, detailed",
)
REFERENCE = "a photo of a {}"
PADDING_PROBED = 4  # padding positions right after EOS that are measured


@dataclass
class StabilityReport:
    """s(e) values for one word, pooled over the contexts."""

    word: str
    at_word: list[float] = field(default_factory=list)  # one per context
    elsewhere: list[float] = field(default_factory=list)  # every other real token of every context
    padding: list[float] = field(default_factory=list)  # the first PADDING_PROBED padding positions

    def summary(self) -> dict[str, float]:
        return {
            "at word p10": _quantile(self.at_word, 0.1),
            "at word median": _quantile(self.at_word, 0.5),
            "elsewhere p95": _quantile(self.elsewhere, 0.95),
            "elsewhere max": max(self.elsewhere, default=float("nan")),
            "padding p95": _quantile(self.padding, 0.95),
        }


def _quantile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


def word_position(ids: Sequence[int], word_ids: Sequence[int]) -> int | None:
    """Index of the last token of the last occurrence of `word_ids` in `ids`."""
    ids, word_ids = list(ids), list(word_ids)
    for start in range(len(ids) - len(word_ids), -1, -1):
        if ids[start : start + len(word_ids)] == word_ids:
            return start + len(word_ids) - 1
    return None


@torch.no_grad()
def context_stability(
    encode: Encode,
    tokenizer: Any,  # a transformers tokenizer
    c_inv: torch.Tensor,
    word: str,
    other: str,
    contexts: Sequence[str] = CONTEXTS,
    reference: str = REFERENCE,
) -> StabilityReport:
    """s(e) against i_word (the encoding of `word` in `reference`) at the word and elsewhere in `contexts`.
    `other` fills "{other}" (another word of the same kind: a second object). c_inv (d, d) float64."""
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    prompts = [reference.format(word)] + [c.replace("{other}", other).format(word) for c in contexts]
    batch = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    states = encode(batch.input_ids).to(torch.float64).cpu()  # (n, m, d)
    ids = batch.input_ids.tolist()
    lengths = batch.attention_mask.sum(1).tolist()  # BOS .. EOS
    reference_position = word_position(ids[0][: lengths[0]], word_ids)
    if reference_position is None:
        raise ValueError(f"{word!r} does not survive tokenization in {reference!r}")
    target = states[0, reference_position]  # i_word (d,)
    dual = c_inv.to(torch.float64) @ target  # C^-1 i
    similarity = states @ dual / (target @ dual)  # (n, m): s(e) at every position, eq. 3
    report = StabilityReport(word)
    for row in range(1, len(prompts)):
        length = int(lengths[row])
        position = word_position(ids[row][:length], word_ids)
        if position is None:
            raise ValueError(f"{word!r} does not survive tokenization in {prompts[row]!r}")
        report.at_word.append(float(similarity[row, position]))
        report.elsewhere += [float(similarity[row, k]) for k in range(length) if k != position]
        report.padding += [float(s) for s in similarity[row, length : length + PADDING_PROBED]]
    return report
