"""DynaIP's training data in the toy world (DYNAIP.md, "Training data"): single-subject pairs.

A pair is a reference photo of one object alone on a plain background, at its own position and scale, and a
target scene containing the same object (the same shape, color, texture and mark) somewhere else, on another
background, sometimes beside a second object; the target's caption names the subject by its shape word only
("a star next to a red striped circle on a blue background"), so what it looks like can come only from the
reference, while the caption still says where and with what.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from perfusion.toyworld.language import BACKGROUND_PHRASES, PAIR_JOINS, _a, _with_article, object_phrase
from perfusion.toyworld.world import PALETTE, Scene, sample_scene

TWO_OBJECTS = 0.4  # fraction of targets with a second object beside the subject


@dataclass(frozen=True)
class TrainingPair:
    reference: Scene  # the subject alone
    target: Scene  # the subject in a new scene
    caption: str  # the target's caption, the subject named by its shape word only
    subject: int  # index of the subject in target.objects


def sample_pair(rng: random.Random, two_objects: float = TWO_OBJECTS) -> TrainingPair:
    target = sample_scene(rng, two_objects=two_objects)
    subject = rng.randrange(len(target.objects))
    obj = target.objects[subject]
    radius = rng.randint(9, 11)  # the reference's own scale and position (concept_scene's, as catalog photos)
    center = (rng.randint(radius + 1, 32 - radius - 2), rng.randint(radius + 1, 32 - radius - 2))
    backgrounds = [c for c in PALETTE if c not in (obj.color, target.background)]
    reference = Scene(rng.choice(backgrounds), (replace(obj, center=center, radius=radius),))
    return TrainingPair(reference, target, pair_caption(target, subject, rng), subject)


def pair_caption(scene: Scene, subject: int, rng: random.Random) -> str:
    """The scene in words with the subject said as "a <shape>"; the other object and the background in full."""
    phrases = [
        _with_article(obj.shape, rng) if index == subject else object_phrase(obj, rng)
        for index, obj in enumerate(scene.objects)
    ]
    things = phrases[0] if len(phrases) == 1 else rng.choice(PAIR_JOINS).format(a=phrases[0], b=phrases[1])
    return _a(f"{things} {rng.choice(BACKGROUND_PHRASES).format(scene.background)}")
