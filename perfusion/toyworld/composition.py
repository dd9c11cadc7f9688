"""Several products in one scene, judged by the oracle: what benchmarks/composition.py counts.

For a render of a prompt naming products a and b (and maybe a background), from the oracle's reading:
- present(x): an object of x's shape and color; exact(x): of its texture and mark too (oracle.has_concept);
  colored(x): an object of x's color, whatever its shape (a product whose color bled into the other's is not);
- apart: two different objects, one present-matching a and the other b (not one object counted twice);
- two objects: the scene holds at least two separate objects, whatever they are (not one merged blob);
- copies: two or more objects of one product and none of the other, the failure a shared edit produces
  ("two copies of one product");
- background: the one the prompt asks for (None when it asks for none).
"""

from __future__ import annotations

from dataclasses import dataclass

from perfusion.toyworld.oracle import ObjectReading, Reading, has_concept
from perfusion.toyworld.world import PersonalConcept

# (template, the background it asks for): backgrounds of no catalog product's color, so the oracle can
# tell product from background; one form puts b first, one names no background.
PAIR_FORMS: tuple[tuple[str, str | None], ...] = (
    ("{a} and {b} on a white background", "white"),
    ("a photo of {a} next to {b}", None),
    ("{b} beside {a} on a yellow background", "yellow"),
    ("{a} to the left of {b} on a black background", "black"),
)
SINGLE_FORMS: tuple[tuple[str, str | None], ...] = (
    ("{a} on a white background", "white"),
    ("a photo of {a} on a yellow background", "yellow"),
)


def matches(found: ObjectReading, product: PersonalConcept) -> bool:
    """The object has the product's shape and color (texture and mark aside)."""
    return found.shape == product.superclass and found.color == product.color


@dataclass(frozen=True)
class PairVerdict:
    present: tuple[bool, bool]  # a, b
    exact: tuple[bool, bool]
    colored: tuple[bool, bool]
    apart: bool
    two_objects: bool
    copies: bool
    background: bool | None  # None: the prompt asks for no background

    @property
    def both_present(self) -> bool:
        return all(self.present) and self.apart

    @property
    def both_exact(self) -> bool:
        return all(self.exact) and self.apart


def judge_pair(reading: Reading, a: PersonalConcept, b: PersonalConcept, background: str | None) -> PairVerdict:
    objects = reading.objects
    for_a = [k for k, found in enumerate(objects) if matches(found, a)]
    for_b = [k for k, found in enumerate(objects) if matches(found, b)]
    apart = any(i != j for i in for_a for j in for_b)
    copies = (len(for_a) >= 2 and not for_b) or (len(for_b) >= 2 and not for_a)
    return PairVerdict(
        present=(bool(for_a), bool(for_b)),
        exact=(has_concept(reading, a), has_concept(reading, b)),
        colored=(any(o.color == a.color for o in objects), any(o.color == b.color for o in objects)),
        apart=apart,
        two_objects=len(objects) >= 2,
        copies=copies,
        background=None if background is None else reading.background == background,
    )


@dataclass(frozen=True)
class SingleVerdict:
    present: bool
    exact: bool
    background: bool | None


def judge_single(reading: Reading, a: PersonalConcept, background: str | None) -> SingleVerdict:
    return SingleVerdict(
        present=any(matches(found, a) for found in reading.objects),
        exact=has_concept(reading, a),
        background=None if background is None else reading.background == background,
    )
