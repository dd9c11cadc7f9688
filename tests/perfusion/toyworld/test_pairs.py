"""DynaIP's toy training pairs: the same object in both, its look said by the reference only."""

from __future__ import annotations

import random

from perfusion.toyworld.language import vocabulary
from perfusion.toyworld.pairs import sample_pair
from perfusion.toyworld.world import TEXTURES


def test_pairs_show_one_object_twice_and_name_it_by_its_shape_only() -> None:
    rng = random.Random(0)
    known = set(vocabulary())
    for _ in range(200):
        pair = sample_pair(rng)
        (reference,) = pair.reference.objects
        subject = pair.target.objects[pair.subject]
        same = ("shape", "color", "texture", "mark")
        assert all(getattr(reference, f) == getattr(subject, f) for f in same)
        assert pair.reference.background not in (pair.target.background, subject.color)
        words = pair.caption.replace(",", " ").split()
        assert subject.shape in words and pair.target.background in words
        assert set(words) <= known
        if len(pair.target.objects) == 1:  # nothing of the subject's look in its caption
            assert subject.color not in words and not any(t in words for t in TEXTURES if t != "plain")
