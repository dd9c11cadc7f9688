"""The oracle reads clean generator pictures exactly (>= 99%) and stays usable on noisy ones."""

from __future__ import annotations

import random

import numpy as np
import pytest

from perfusion.toyworld.oracle import has_concept, read_batch, soften
from perfusion.toyworld.world import PERSONAL_CONCEPTS, concept_scene, render, sample_scene


def _score(scenes, noise: float = 0.0, seed: int = 0, blur: float = 0.0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    images = [render(s) for s in scenes]
    if blur:  # soft edges, as a model renders them
        images = [soften(i, blur) for i in images]
    images = [i.astype(np.float32) for i in images]
    if noise:
        images = [np.clip(i + rng.normal(0, noise, i.shape), 0, 255) for i in images]
    readings = read_batch([i.astype(np.uint8) for i in images])
    hits = {"background": 0, "count": 0, "color": 0, "shape": 0, "texture": 0, "mark": 0}
    objects = 0
    for scene, reading in zip(scenes, readings, strict=True):
        hits["background"] += reading.background == scene.background
        hits["count"] += len(reading.objects) == len(scene.objects)
        truth = sorted(scene.objects, key=lambda o: o.center[0])
        seen = sorted(reading.objects, key=lambda o: o.center[0])
        for expected, got in zip(truth, seen, strict=False):
            objects += 1
            for field in ("color", "shape", "texture", "mark"):
                hits[field] += getattr(expected, field) == getattr(got, field)
    return {k: v / (len(scenes) if k in ("background", "count") else objects) for k, v in hits.items()}


@pytest.fixture(scope="module")
def world_scenes():
    rng = random.Random(2024)
    scenes = [sample_scene(rng) for _ in range(400)]
    scenes += [concept_scene(c, rng) for c in PERSONAL_CONCEPTS for _ in range(50)]
    return scenes


def test_oracle_reads_clean_pictures_at_least_99_percent(world_scenes):
    scores = _score(world_scenes)
    assert all(value >= 0.99 for value in scores.values()), scores


def test_oracle_tolerates_pixel_noise(world_scenes):
    scores = _score(world_scenes, noise=8.0)
    assert all(value >= 0.95 for value in scores.values()), scores


def test_oracle_tolerates_soft_edges(world_scenes):
    scores = _score(world_scenes, noise=4.0, blur=0.6)
    assert all(value >= 0.95 for value in scores.values()), scores


def test_concept_presence(world_scenes):
    rng = random.Random(7)
    for concept in PERSONAL_CONCEPTS:
        pictures = [render(concept_scene(concept, rng)) for _ in range(40)]
        readings = read_batch(pictures)
        assert sum(has_concept(r, concept) for r in readings) >= 0.99 * len(readings), concept.name
        others = [c for c in PERSONAL_CONCEPTS if c is not concept]
        assert not any(has_concept(r, other) for r in readings for other in others)
    plain = read_batch([render(s) for s in world_scenes[:400]])  # no pretraining object is a product
    assert sum(has_concept(r, c) for r in plain for c in PERSONAL_CONCEPTS) <= 4


def test_float_pictures_in_unit_range_are_read_too():
    scene = sample_scene(random.Random(3))
    as_float = render(scene).astype(np.float32) / 255.0
    assert read_batch([as_float])[0].background == scene.background
