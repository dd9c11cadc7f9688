"""A catalog that mixes trained and zero-shot products, end to end on an embedded Ray: zero-shot products are
onboarded (no training) on their MM-DiT base with files and index rows like any concept's, a render job
holding both kinds renders each kind's rows on its own base, and what zero-shot cannot serve is refused
before any work."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from perfusion.errors import BaseModelError
from pipeline.cli import app
from pipeline.index import ConceptIndex, RenderIndex
from pipeline.manifest import ManifestError, load_manifest
from pipeline.store import Store
from pipeline.train import TrainRun
from tests.pipeline.conftest import write_catalog

runner = CliRunner()

ZERO_SHOT = """\
zero_shot: {base_model: tiny-mmdit}
"""
RENDERS = """\
renders:
  - name: shots
    prompts: ["a photo of {a}", "{a} next to {b}"]
    steps: 2
    guidance_scale: 2.0
"""


def mixed_catalog(tmp_path, zero_shot=("cup", "pot"), extra=ZERO_SHOT + RENDERS):  # type: ignore[no-untyped-def]
    """mug and bag trained on tiny; cup and pot zero-shot on tiny-mmdit."""
    manifest = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug", "bag", "cup", "pot"))
    text = manifest.read_text()
    for name in zero_shot:
        text = text.replace(
            f"    images: [photos/{name}/*.png]\n",
            f"    images: [photos/{name}/*.png]\n    training: {{method: zero-shot}}\n",
        )
    manifest.write_text(text + extra)
    return manifest


def test_a_mixed_catalog_onboards_zero_shot_products_and_renders_each_kind_on_its_base(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = mixed_catalog(tmp_path)
    validated = runner.invoke(app, ["validate", str(manifest)])
    assert validated.exit_code == 0, validated.output
    assert "cup <cup>: 3 image(s), would onboard" in validated.output
    assert "mug <mug>: 3 image(s), would train" in validated.output
    trained = runner.invoke(app, ["train", str(manifest)])
    assert trained.exit_code == 0, trained.output
    rows = {r["name"]: r for r in ConceptIndex(Store(str(root))).latest()}
    assert sorted(rows) == ["bag", "cup", "mug", "pot"]
    for name in ("cup", "pot"):
        row = rows[name]
        assert (row["method"], row["method_version"], row["base_model"]) == ("zero-shot", "zero-shot-1", "tiny-mmdit")
        assert row["steps"] is None and 0 < row["bytes"] <= 64 * 1024
        assert row["fingerprint"] != rows["mug"]["fingerprint"]
    assert rows["mug"]["method"] == "perfusion" and rows["mug"]["base_model"] == "tiny"
    again = runner.invoke(app, ["train", str(manifest)])
    assert again.exit_code == 0 and "skipped 4" in again.output  # onboarded products are done like trained ones

    rendered = runner.invoke(app, ["render", str(manifest)])
    assert rendered.exit_code == 0, rendered.output
    # singles: 4 products; pairs: (bag, mug) and (cup, pot) only, never a trained product beside a zero-shot one
    assert "rendered 6, skipped 0" in rendered.output
    images = RenderIndex(Store(str(root))).of_job("shots")
    pairs = sorted(json.loads(r["concept_names"]) for r in images if "next to" in r["template"])
    assert pairs == [["bag", "mug"], ["cup", "pot"]]
    by_names = {tuple(json.loads(r["concept_names"])): r for r in images}
    assert by_names[("cup", "pot")]["base_model"] == "tiny-mmdit"
    assert by_names[("cup", "pot")]["fingerprint"] == rows["cup"]["fingerprint"]
    assert by_names[("bag", "mug")]["base_model"] == "tiny"
    assert by_names[("cup", "pot")]["prompt"] == "<cup> next to <pot>"
    store = Store(str(root))
    cup, pot = (
        Image.open(store.path(store.locate(by_names[(n,)]["image_uri"]))) for n in ("cup", "pot")
    )  # the same prompt and seed with another product's photos: another image
    assert cup.size == (32, 32) and cup.tobytes() != pot.tobytes()


def test_a_zero_shot_product_with_a_bad_photo_fails_alone_naming_it(tmp_path, ray_local):
    manifest = mixed_catalog(tmp_path, extra=ZERO_SHOT)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "shop" / "photos" / "pot" / "1.png")
    summary = TrainRun(load_manifest(manifest)).execute()
    states = {name: state.status for name, state in summary.concepts.items()}
    assert states == {"mug": "succeeded", "bag": "succeeded", "cup": "succeeded", "pot": "failed"}
    error = summary.concepts["pot"].error or ""
    assert "product 'pot'" in error and "1.png is 16x16" in error and "32x32" in error


def test_what_zero_shot_cannot_serve_is_refused_before_any_work(tmp_path):
    on_a_unet = mixed_catalog(tmp_path / "unet", extra="zero_shot: {base_model: tiny}\n")
    with pytest.raises(BaseModelError, match=r"zero_shot\.base_model 'tiny'.*UNet base"):
        TrainRun(load_manifest(on_a_unet)).local_plan()
    mixing = mixed_catalog(
        tmp_path / "mix",
        extra=ZERO_SHOT
        + RENDERS.replace("    steps: 2\n", "    combinations: [[mug, cup]]\n    gates: {cup: {beta: 0.5}}\n"),
    )
    with pytest.raises(ManifestError) as refused:
        load_manifest(mixing)
    text = str(refused.value)
    assert "renders[0].combinations[0]: mixes zero-shot products ['cup'] with trained ones ['mug']" in text
    assert "renders[0].gates.cup: 'cup' is a zero-shot product: it has no gate" in text
    masked = mixed_catalog(tmp_path / "masked", extra=ZERO_SHOT)
    masked.write_text(
        masked.read_text().replace("training: {method: zero-shot}", "training: {method: zero-shot, steps: 9}", 1)
    )
    with pytest.raises(ManifestError, match=r"concepts\[2\].training.steps: a zero-shot product is not trained"):
        load_manifest(masked)
