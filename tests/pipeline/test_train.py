"""The training fan-out end to end on an embedded Ray with the tiny model: isolation of failures,
idempotent reruns, resume after a fix, and a task killed between its file and its row."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.index import ConceptIndex
from pipeline.manifest import load_manifest
from pipeline.store import Store
from pipeline.tasks import train_one
from pipeline.train import TrainRun
from pipeline.worker import prepare_base
from tests.pipeline.conftest import write_catalog

runner = CliRunner()


def train(manifest, *flags):
    return runner.invoke(app, ["train", str(manifest), *flags])


def test_one_corrupt_image_fails_one_concept_and_reruns_train_only_what_changed(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root))
    corrupt = tmp_path / "shop" / "photos" / "cup" / "1.png"
    good_bytes = corrupt.read_bytes()
    corrupt.write_bytes(good_bytes[: len(good_bytes) // 3])  # a truncated upload

    first = train(manifest)
    assert first.exit_code == 1, first.output
    index = ConceptIndex(Store(str(root)))
    rows = {r["name"]: r for r in index.latest(status=None)}
    assert {n: r["status"] for n, r in rows.items()} == {"bag": "succeeded", "cup": "failed", "mug": "succeeded"}
    assert "1.png is not a readable image" in rows["cup"]["error"]
    assert "concepts[2].images[0]" in rows["cup"]["error"]  # where in the manifest
    for name in ("bag", "mug"):
        data = Store(str(root)).read(Store(str(root)).relative(rows[name]["file_uri"]), rows[name]["sha256"])
        assert len(data) == rows[name]["bytes"] > 1000
        assert rows[name]["steps"] == 4 and rows[name]["tags"] and rows[name]["fingerprint"]
    assert "trained 2, skipped 0 (already trained), failed 1" in first.output

    again = train(manifest)  # nothing changed: nothing retrains, the failure is still a failure
    assert again.exit_code == 1
    assert "trained 0, skipped 2 (already trained), failed 1" in again.output

    corrupt.write_bytes(good_bytes)  # fix the image: only that concept trains
    fixed = train(manifest)
    assert fixed.exit_code == 0, fixed.output
    assert "trained 1, skipped 2 (already trained), failed 0" in fixed.output
    attempts = index.rows(["name", "status"]).to_pylist()
    assert sorted((a["name"], a["status"]) for a in attempts) == [
        ("bag", "succeeded"),
        ("cup", "failed"),
        ("cup", "failed"),
        ("cup", "succeeded"),
        ("mug", "succeeded"),
    ]

    listed = runner.invoke(app, ["concepts", "list", "--root", str(root), "--format", "json"])
    assert listed.exit_code == 0, listed.output
    assert [r["name"] for r in json.loads(listed.output)] == ["bag", "cup", "mug"]
    shown = runner.invoke(app, ["concepts", "show", "cup", "--root", str(root)])
    assert shown.exit_code == 0 and json.loads(shown.output)[0]["status"] == "succeeded"
    by_tag = runner.invoke(app, ["concepts", "list", "--root", str(root), "--tag", "category=bags", "-f", "csv"])
    assert by_tag.output.splitlines()[1].startswith("bag,<bag>,bag,perfusion,succeeded")
    by_method = runner.invoke(app, ["concepts", "list", "--root", str(root), "--method", "residuals", "-f", "json"])
    assert by_method.exit_code == 0 and json.loads(by_method.output) == []
    misspelled = runner.invoke(app, ["concepts", "list", "--root", str(root), "--method", "residual"])
    assert misspelled.exit_code != 0 and "--method 'residual': use one of" in misspelled.output
    query = runner.invoke(
        app, ["concepts", "query", "SELECT count(*) AS n FROM concepts", "--root", str(root), "-f", "json"]
    )
    assert json.loads(query.output) == [{"n": 5}]


def test_dry_run_only_and_force(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug", "bag"))
    dry = train(manifest, "--dry-run")
    assert dry.exit_code == 0 and "would train 2" in dry.output
    assert ConceptIndex(Store(str(root))).latest(status=None) == []  # a dry run writes no rows
    assert not [p for p in root.rglob("*") if p.is_file()]  # nor anything else (the covariance waits for a run)
    only = train(manifest, "--only", "bag")
    assert only.exit_code == 0 and "trained 1" in only.output
    assert [r["name"] for r in ConceptIndex(Store(str(root))).latest()] == ["bag"]
    forced = train(manifest, "--only", "bag", "--force")
    assert forced.exit_code == 0 and "trained 1" in forced.output
    files = Store(str(root)).list("concepts")
    assert len(files) == 2  # the forced retrain wrote a new file beside the old one
    unknown = train(manifest, "--only", "nope")
    assert unknown.exit_code == 2 and "--only: no concept named 'nope'" in unknown.output


def test_a_task_killed_after_its_file_but_before_its_row_is_adopted_on_retry(tmp_path, ray_local):
    """The file exists (create-only) but no row: the retry neither fails on the file nor leaves it orphaned."""
    root = tmp_path / "store"
    manifest = load_manifest(write_catalog(tmp_path / "shop", str(root), names=("mug",)))
    run = TrainRun(manifest)
    base = prepare_base(run.base_model, run.store.root)
    ((item, _),) = run.plan(base)
    first = train_one(run._task(item, base))  # the worker wrote the file ... and the driver died: no row
    assert first.status == "succeeded" and ConceptIndex(run.store).latest() == []
    summary = run.execute()
    assert summary.concepts["mug"].status == "succeeded"
    (row,) = ConceptIndex(run.store).latest()
    assert row["sha256"] == first.sha256 and row["file_uri"] == first.file_uri
    assert run.store.list("concepts") == [item.file]


def test_a_damaged_leftover_file_is_replaced_by_the_retry(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = load_manifest(write_catalog(tmp_path / "shop", str(root), names=("mug",)))
    run = TrainRun(manifest)
    base = prepare_base(run.base_model, run.store.root)
    ((item, _),) = run.plan(base)
    run.store.write_once(item.file, b"half a file")
    summary = run.execute()
    assert summary.concepts["mug"].status == "succeeded"
    (row,) = ConceptIndex(run.store).latest()
    assert run.store.read(item.file, row["sha256"]) != b"half a file"


def test_display_is_live_only_on_a_terminal_outside_a_ray_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from pipeline.progress import LiveDisplay, LogDisplay, make_display

    for variable in ("RAY_JOB_SUBMISSION_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(variable, raising=False)
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(make_display(terminal), LiveDisplay)
    assert isinstance(make_display(Console(file=io.StringIO(), force_terminal=False)), LogDisplay)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a driver on a laptop, attached to a cluster: still live
    assert isinstance(make_display(terminal), LiveDisplay)
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_1")  # a Ray Job's log is a file: plain lines
    assert isinstance(make_display(terminal), LogDisplay)
