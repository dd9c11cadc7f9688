"""The toy world's generator keeps the promises its oracle relies on."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from perfusion.toyworld.world import (
    HELD_OUT,
    MARK_RATE,
    MARKS,
    PALETTE,
    PERSONAL_COMBINATIONS,
    PERSONAL_CONCEPTS,
    SHAPES,
    TEXTURES,
    ObjectSpec,
    Scene,
    concept_images,
    concept_masks,
    mark_visibility,
    render,
    sample_scene,
    shade,
    shape_mask,
)


def test_generation_is_deterministic():
    first = [render(sample_scene(random.Random(3))) for _ in range(3)]
    again = [render(sample_scene(random.Random(3))) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(concept_images(PERSONAL_CONCEPTS[0], 3), concept_images(PERSONAL_CONCEPTS[0], 3), strict=True)
    )


def test_pretraining_scenes_skip_held_out_pairs_and_products_and_never_share_a_color():
    rng = random.Random(0)
    marks: Counter[str] = Counter()
    for _ in range(2000):
        scene = sample_scene(rng)
        colors = [o.color for o in scene.objects]
        assert scene.background not in colors and len(set(colors)) == len(colors)
        for obj in scene.objects:
            assert (obj.color, obj.shape) not in HELD_OUT
            assert (obj.shape, obj.color, obj.mark) not in PERSONAL_COMBINATIONS
            assert obj.mark == "none" or mark_visibility(obj) >= 0.5  # a mark the caption names is there to see
            marks[obj.mark] += 1
    marked = sum(marks.values()) - marks["none"]
    # some bodies show no mark (a notch off a star's arm)
    assert MARK_RATE - 0.15 < marked / sum(marks.values()) < MARK_RATE
    assert set(marks) == set(MARKS)


@pytest.mark.parametrize("texture", TEXTURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_object_color_is_the_majority_of_its_pixels(shape, texture):
    for radius in (6, 8, 11):
        obj = ObjectSpec(shape, "red", texture, "none", (16, 16), radius)
        pixels = render(Scene("white", (obj,)))[shape_mask(shape, (16, 16), radius)]
        own = (pixels == PALETTE["red"]).all(-1).mean()
        patterned = (pixels == shade("red")).all(-1).mean()
        assert own > 0.5 and abs(own + patterned - 1) < 1e-9
        assert (patterned > 0) == (texture != "plain")


def test_personal_concepts_are_marked_combinations_the_pretraining_world_never_shows():
    assert len(PERSONAL_CONCEPTS) == 4
    assert all(c.mark != "none" for c in PERSONAL_CONCEPTS)
    assert {(c.superclass, c.color, c.mark) for c in PERSONAL_CONCEPTS} == PERSONAL_COMBINATIONS
    assert len({c.name for c in PERSONAL_CONCEPTS}) == 4


def test_concept_masks_cover_exactly_the_product_in_its_photos():
    for concept in PERSONAL_CONCEPTS:
        for photo, mask in zip(concept_images(concept, 4, seed=5), concept_masks(concept, 4, seed=5), strict=True):
            pixels, inside = np.asarray(photo), np.asarray(mask) > 0
            background = pixels[0, 0]
            assert not (pixels[~inside] != background).any()  # nothing of the product outside its mask
            assert (pixels[inside] != background).any(-1).mean() > 0.9  # (a black mark on black may blend in)
