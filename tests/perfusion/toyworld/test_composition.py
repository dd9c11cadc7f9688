"""Composition judged by the oracle (perfusion/toyworld/composition.py) on pictures whose truth is known, and
the composition benchmark's measurement on a few renders (its fast subset)."""

from __future__ import annotations

import numpy as np
import pytest

import perfusion
from benchmarks import composition
from perfusion.toyworld.composition import judge_pair, judge_single
from perfusion.toyworld.oracle import read
from perfusion.toyworld.world import PERSONAL_CONCEPTS, Scene, render

STAR, SQUARE, RING = PERSONAL_CONCEPTS[0], PERSONAL_CONCEPTS[1], PERSONAL_CONCEPTS[2]


def scene(background: str, *objects) -> np.ndarray:
    return render(Scene(background, tuple(product.object(center, 7) for product, center in objects)))


def test_two_distinct_products_are_both_present_and_exact():
    verdict = judge_pair(read(scene("white", (STAR, (8, 16)), (RING, (24, 16)))), STAR, RING, "white")
    assert verdict.present == (True, True) and verdict.exact == (True, True)
    assert verdict.apart and verdict.two_objects and not verdict.copies and verdict.background is True
    assert verdict.colored == (True, True)
    assert verdict.both_present and verdict.both_exact


def test_two_copies_of_one_product_are_named_and_not_counted_as_the_pair():
    verdict = judge_pair(read(scene("yellow", (STAR, (8, 16)), (STAR, (24, 16)))), STAR, RING, "yellow")
    assert verdict.copies and not verdict.apart and verdict.two_objects and verdict.present == (True, False)
    assert verdict.colored == (True, False)
    assert not verdict.both_present


def test_a_product_of_the_right_shape_and_color_but_another_texture_is_present_not_exact():
    plain_star = perfusion.toyworld.world.PersonalConcept("plain-star", "star", "purple", "plain", "none")
    reading = read(scene("black", (plain_star, (8, 16)), (SQUARE, (24, 16))))
    verdict = judge_pair(reading, STAR, SQUARE, None)
    assert verdict.present == (True, True) and verdict.exact == (False, True) and verdict.background is None
    assert verdict.both_present and not verdict.both_exact
    alone = judge_single(reading, STAR, "white")
    assert alone.present and not alone.exact and alone.background is False


def test_the_benchmark_plans_every_pair_in_every_form_and_counts_what_it_renders(toy_covariance):
    renders = composition.plan(seeds=2)
    pairs = [r for r in renders if len(r.names) == 2]
    assert len(pairs) == 6 * len(composition.PAIR_FORMS) * 2
    assert len(renders) - len(pairs) == 4 * len(composition.SINGLE_FORMS) * 2
    assert {r.names for r in pairs} >= {("dotted-star", "striped-square"), ("checkered-ring", "marked-circle")}
    base = perfusion.load_base("toy")
    covariance = toy_covariance
    renderer = perfusion.ConceptRenderer(base, covariance)
    for product in PERSONAL_CONCEPTS:
        renderer.attach(perfusion.training.initial_concept(base, f"<{product.name}>", product.superclass))
    subset = [pairs[0], renders[-1]]  # one pair, one product alone
    settings = perfusion.RenderSettings(steps=2, guidance_scale=4.0)
    tally, failing = composition.measure(renderer, subset, settings, clip=None)
    assert (tally.pairs, tally.singles) == (1, 1)
    assert tally.both_exact <= tally.both_present <= tally.two_objects <= 1 and tally.each_present <= 2
    assert len(failing) == 1 - tally.both_present and len(tally.pair_background) == 1
    assert tally.seconds_per_image > 0 and "| local | 1 |" in tally.row("local")


def test_the_benchmark_refuses_unknown_variants_before_loading_anything():
    with pytest.raises(SystemExit):
        composition.parse_flags(composition.CompositionConfig, "x", ["--variants", "local,boxes", "--clip", "none"])


def test_the_benchmark_measures_residual_concepts_with_lag(toy_covariance, tmp_path):
    config = composition.parse_flags(
        composition.CompositionConfig,
        "x",
        ["--untrained", "--variants", "residuals LAG,residuals everywhere", "--clip", "none", "--out", str(tmp_path)],
    )
    base = perfusion.load_base("toy")
    products = composition.products(config, base, toy_covariance, "residuals")
    assert [p.method for p in products] == ["residuals"] * len(PERSONAL_CONCEPTS)
    renderer = perfusion.ConceptRenderer(base, toy_covariance)
    for product in products:
        renderer.attach(product)
    pair = next(r for r in composition.plan(seeds=1) if len(r.names) == 2)
    settings = perfusion.RenderSettings(steps=2, guidance_scale=4.0, localized=True)
    tally, _ = composition.measure(renderer, [pair], settings, clip=None)
    assert tally.pairs == 1 and "| residuals LAG | 1 |" in tally.row("residuals LAG")
