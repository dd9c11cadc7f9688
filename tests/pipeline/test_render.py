"""`perfusion-batch render` end to end on an embedded Ray with the tiny model: single and pair
combinations, images + rows + contact sheet, idempotent reruns, a new concept renders only its rows, and
bad inputs refused before anything renders."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.index import ConceptIndex, RenderIndex
from pipeline.store import Store
from tests.helpers import http_receiver
from tests.pipeline.conftest import write_catalog

runner = CliRunner()

RENDERS = """\
renders:
  - name: shots
    prompts: ["a photo of {a}", "{a} next to {b}"]
    images_per_prompt: 2
    steps: 3
    guidance_scale: 2.0
"""


def cli(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args])


def catalog_with_renders(tmp_path, names=("mug", "bag"), renders=RENDERS):  # type: ignore[no-untyped-def]
    manifest = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=names)
    manifest.write_text(manifest.read_text() + renders)
    return manifest


def test_render_single_and_pairs_then_rerun_and_add_a_concept(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = catalog_with_renders(tmp_path)
    assert cli("train", str(manifest)).exit_code == 0

    first = cli("render", str(manifest))
    assert first.exit_code == 0, first.output
    # 2 singles x 2 seeds + 1 pair x 2 seeds
    assert "rendered 6, skipped 0 (already rendered), failed 0" in first.output
    index = RenderIndex(Store(str(root)))
    rows = index.of_job("shots")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"succeeded"}
    assert sorted(json.loads(r["concept_names"]) for r in rows if "next to" in r["template"]) == [["bag", "mug"]] * 2
    assert {r["prompt"] for r in rows} == {"a photo of <bag>", "a photo of <mug>", "<bag> next to <mug>"}
    for row in rows:
        data = Store(str(root)).read(Store(str(root)).locate(row["image_uri"]), row["sha256"])
        assert len(data) == row["bytes"] and row["width"] == row["height"] == 32
    sheet = Image.open(root / "renders" / "sheets" / "shots.png")
    assert sheet.width > 2 * 128 and sheet.height > 3 * 128  # 3 prompts x 2 seeds
    page = (root / "renders" / "sheets" / "shots.html").read_text()
    assert page.count("<tr>") == 7 and "&lt;bag&gt; next to &lt;mug&gt;" in page

    with http_receiver() as (gateway, received):  # a scheduler firing again: nothing new, summary pushed
        again = cli("render", str(manifest), "--pushgateway", gateway, "--schedule", "nightly")
    assert again.exit_code == 0 and "rendered 0, skipped 6" in again.output
    ((method, path, body),) = received
    assert (method, path) == ("POST", "/metrics/job/perfusion-batch-render/catalog/test-shop/schedule/nightly")
    assert 'perfusion_batch_job_images{status="skipped"} 6.0' in body.decode()
    assert "perfusion_batch_job_last_success_timestamp_seconds" in body.decode()
    assert len(index.rows(["render_id"])) == 6

    grown = catalog_with_renders(tmp_path, names=("mug", "bag", "cup"))
    assert cli("train", str(grown)).exit_code == 0
    more = cli("render", str(grown))
    # new: cup alone (2 seeds) + pairs with cup: (bag, cup), (cup, mug) x 2 seeds
    assert more.exit_code == 0 and "rendered 6, skipped 6" in more.output, more.output
    assert len(index.of_job("shots")) == 12

    listed = cli("renders", "list", "--root", str(root), "--format", "json")
    assert listed.exit_code == 0 and len(json.loads(listed.output)) == 12
    sql = "SELECT count(DISTINCT prompt) AS n FROM renders"
    query = cli("renders", "query", sql, "--root", str(root), "-f", "json")
    assert json.loads(query.output) == [{"n": 6}]


def test_bad_render_inputs_are_refused_before_anything_renders(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = catalog_with_renders(tmp_path, names=("mug", "bag"))

    untrained = cli("render", str(manifest))  # nothing trained yet
    assert untrained.exit_code == 2
    assert "concept 'bag' is not trained yet" in untrained.output and "concept 'mug'" in untrained.output

    bad = manifest.read_text().replace(RENDERS, "") + (
        "renders:\n"
        "  - name: bad\n"
        "    prompts: ['{a} and {c}', 'photo of {b}', '{a} next to {b}']\n"
        "    combinations: [[mug, nope]]\n"
        "    gates: {cup: {beta: 0.5}}\n"
    )
    manifest.write_text(bad)
    result = cli("render", str(manifest))
    assert result.exit_code == 2
    assert "renders[0].prompts[0]: placeholders ['a', 'c'] must be ['a', 'b']" in result.output
    assert "renders[0].prompts[1]: placeholders ['b'] must be ['a']" in result.output
    assert "renders[0].combinations[0][1]: no concept named 'nope'" in result.output
    assert "renders[0].gates.cup: no concept named 'cup'" in result.output
    assert not (root / "renders").exists()

    long_prompt = "a photo of {a} " + "on a very shiny table " * 20
    manifest.write_text(bad.split("renders:")[0] + f"renders:\n  - name: long\n    prompts: ['{long_prompt}']\n")
    assert cli("train", str(manifest)).exit_code == 0
    too_long = cli("render", str(manifest))
    assert too_long.exit_code == 2 and "renders[0].prompts[0]" in too_long.output
    assert "more than the text encoder's 77" in too_long.output
    unknown_job = cli("render", str(manifest), "--job", "nope")
    assert unknown_job.exit_code == 2 and "--job: no render job named 'nope'" in unknown_job.output

    catalog = bad.split("renders:")[0]
    negative = "blurry, " * 80  # ~160 tokens: it would be cut at 77
    manifest.write_text(
        catalog + f"renders:\n  - name: odd\n    prompts: ['{{a}} on a table']\n    resolution: 70\n"
        f"    negative_prompt: '{negative}'\n"
    )
    odd = cli("render", str(manifest))
    assert odd.exit_code == 2, odd.output
    assert "renders[0].negative_prompt: 482 tokens, more than the text encoder's 77" in odd.output
    assert "renders[0].resolution: 70 is not a multiple of 4 (the base model's latent grid): use 68 or 72" in odd.output
    assert not (root / "renders").exists()

    # A prompt without placeholders is a control shot of the base model alone.
    manifest.write_text(catalog + "renders:\n  - name: control\n    prompts: ['a photo of a table']\n    steps: 2\n")
    control = cli("render", str(manifest))
    assert control.exit_code == 0, control.output
    assert "rendered 1, skipped 0" in control.output
    (row,) = RenderIndex(Store(str(root))).of_job("control")
    assert json.loads(row["concept_names"]) == [] and row["prompt"] == "a photo of a table"


def test_a_damaged_concept_file_blocks_its_images_and_the_others_render(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = catalog_with_renders(tmp_path, names=("mug", "bag"))
    assert cli("train", str(manifest)).exit_code == 0
    store = Store(str(root))
    concept_file = root / store.locate(ConceptIndex(store).get("mug")["file_uri"])
    concept_file.write_bytes(concept_file.read_bytes()[:-10] + b"0123456789")
    result = cli("render", str(manifest))
    assert result.exit_code == 1, result.output  # the catalog renders what it can: bag alone
    assert "skipped: concept 'mug'" in result.output and "checksum mismatch" in result.output
    assert "rendered 2, skipped 0 (already rendered), failed 0, blocked 4 (a concept cannot render)" in result.output
    rows = RenderIndex(store).of_job("shots")
    assert sorted(json.loads(r["concept_names"]) for r in rows) == [["bag"], ["bag"]]
    assert cli("train", str(manifest)).exit_code == 0  # retrains mug (its file fails its check)
    fixed = cli("render", str(manifest))
    assert fixed.exit_code == 0 and "rendered 4, skipped 2" in fixed.output, fixed.output


def test_dry_run_and_limit(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = catalog_with_renders(tmp_path, names=("mug", "bag"))
    assert cli("train", str(manifest)).exit_code == 0
    dry = cli("render", str(manifest), "--dry-run")
    assert dry.exit_code == 0 and "would render 6, skipped 0" in dry.output
    assert not (root / "renders").exists()
    limited = cli("render", str(manifest), "--limit", "2")
    assert limited.exit_code == 0 and "rendered 2, skipped 0" in limited.output
    rest = cli("render", str(manifest))
    assert rest.exit_code == 0 and "rendered 4, skipped 2" in rest.output


@pytest.mark.parametrize("flag", ["--limit", "--batch-size", "--actors"])
def test_bad_render_flags(tmp_path, flag):
    manifest = catalog_with_renders(tmp_path)
    result = cli("render", str(manifest), flag, "0")
    assert result.exit_code == 2 and flag in result.output


def test_a_store_copied_elsewhere_renders_and_trains_nothing_again(tmp_path, ray_local):
    import shutil

    root = tmp_path / "store"
    manifest = catalog_with_renders(tmp_path, names=("mug", "bag"))
    assert cli("train", str(manifest)).exit_code == 0
    assert cli("render", str(manifest)).exit_code == 0
    copy = tmp_path / "restored" / "store"
    shutil.copytree(root, copy)
    shutil.rmtree(root)  # the original is gone: only the copy can answer
    rows = ConceptIndex(Store(str(copy))).latest()
    assert {r["file_uri"].split("/")[0] for r in rows} == {"concepts"}  # recorded relative to the root
    trained = cli("train", str(manifest), "--root", str(copy))
    assert trained.exit_code == 0 and "trained 0, skipped 2 (already trained)" in trained.output, trained.output
    rendered = cli("render", str(manifest), "--root", str(copy))
    assert rendered.exit_code == 0 and "rendered 0, skipped 6" in rendered.output, rendered.output
    shown = cli("concepts", "show", "mug", "--root", str(copy))
    assert shown.exit_code == 0 and json.loads(shown.output)[0]["name"] == "mug"
    assert not root.exists()


def test_rows_written_with_absolute_uris_are_found_in_a_moved_store(tmp_path):
    from pipeline.store import StoreError

    store = Store(str(tmp_path / "new"))
    assert store.locate("concepts/k.safetensors") == "concepts/k.safetensors"
    assert store.locate(store.uri("renders/r.png")) == "renders/r.png"
    assert store.locate("s3://old-bucket/shop/concepts/k.safetensors") == "concepts/k.safetensors"
    with pytest.raises(StoreError, match="would leave the storage root"):
        store.locate("../outside.safetensors")
