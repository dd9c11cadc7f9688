"""The training fan-out end to end on an embedded Ray with the tiny model: isolation of failures,
idempotent reruns, resume after a fix, and a task killed between its file and its row."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.query import LIST_COLUMNS
from pipeline.index import ConceptIndex
from pipeline.manifest import load_manifest
from pipeline.progress import summary_line
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
    assert "1.png cannot be decoded" in rows["cup"]["error"]
    assert "concepts[2].images[0]" in rows["cup"]["error"]  # where in the manifest
    for name in ("bag", "mug"):
        data = Store(str(root)).read(Store(str(root)).locate(rows[name]["file_uri"]), rows[name]["sha256"])
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
    # The table outside a terminal (a log): one line a row, whole words, however narrow the terminal.
    plain = runner.invoke(app, ["concepts", "list", "--root", str(root)], terminal_width=40).output.splitlines()
    assert plain[0].split() == LIST_COLUMNS and [line.split()[0] for line in plain[1:]] == ["bag", "cup", "mug"]
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
    attempts = ConceptIndex(Store(str(root))).rows(["sha256"]).to_pylist()
    assert len(attempts) == 2 and attempts[0] == attempts[1]  # same inputs, same file, byte for byte
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
    assert not first.adopted
    summary = run.execute()
    assert summary.concepts["mug"].status == "succeeded" and summary.concepts["mug"].adopted
    assert "trained 0, adopted 1 (stored by an interrupted run), skipped 0" in summary_line(summary)
    (row,) = ConceptIndex(run.store).latest()
    assert row["sha256"] == first.sha256 and row["file_uri"] == first.file_uri and row["adopted"] is True
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


def test_validate_refuses_an_off_grid_resolution_and_notes_a_split_superclass(tmp_path):
    manifest = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug", "bag"))
    text = manifest.read_text()
    manifest.write_text(text.replace("training: {steps: 4, batch_size: 2}", "training: {steps: 4, resolution: 70}"))
    off_grid = runner.invoke(app, ["validate", str(manifest)])
    assert off_grid.exit_code == 2, off_grid.output
    assert "training.resolution: 70 is not a multiple of 4 (the base model's latent grid): use 68 or 72" in (
        off_grid.output
    )
    manifest.write_text(text.replace("superclass: mug", "superclass: xylophone"))
    noted = runner.invoke(app, ["validate", str(manifest)])
    assert noted.exit_code == 0, noted.output
    assert "note: superclass 'xylophone' is 4 tokens ['x', 'y', 'lo', 'phone</w>'] for 1 word(s)" in noted.output
    assert noted.output.count("note:") == 1  # 'bag' is one token of the tiny base


def test_a_damaged_stored_file_is_retrained_not_skipped(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug", "bag"))
    assert train(manifest).exit_code == 0
    store = Store(str(root))
    row = ConceptIndex(store).get("mug")
    path = root / store.locate(row["file_uri"])
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    checked = runner.invoke(app, ["validate", str(manifest)])
    assert checked.exit_code == 0, checked.output
    assert "mug <mug>: 3 image(s), would train" in checked.output and "bag <bag>: 3 image(s), already" in checked.output
    assert "note: retrained: its stored file is damaged (checksum mismatch" in checked.output
    again = train(manifest)
    assert again.exit_code == 0 and "trained 1, skipped 1 (already trained), failed 0" in again.output, again.output
    fresh = ConceptIndex(store).get("mug")
    assert store.read(store.locate(fresh["file_uri"]), fresh["sha256"])  # whole again, and what the row says
    assert "trained 0, skipped 2" in train(manifest).output


def test_a_rerun_checks_the_stored_files_concurrently_and_still_reads_each_whole(tmp_path, ray_local, monkeypatch):
    import threading
    import time

    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root))  # mug, bag, cup
    assert train(manifest).exit_code == 0
    running, most, checked = [0], [0], []
    lock = threading.Lock()
    real_read = Store.read

    def slow_read(store, relative, sha256=None):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)  # an object store's round trip
        try:
            return real_read(store, relative, sha256)
        finally:
            with lock:
                running[0] -= 1
                checked.append((relative, sha256 is not None))

    monkeypatch.setattr(Store, "read", slow_read)
    plan = TrainRun(load_manifest(manifest)).local_plan()
    assert [status.value for _, status in plan] == ["skipped"] * 3
    concept_checks = [c for c in checked if c[0].startswith("concepts/")]
    assert len(concept_checks) == 3 and all(verified for _, verified in concept_checks)  # every file, by sha256
    assert most[0] >= 3  # the three checks overlapped


def test_a_decompression_bomb_fails_its_concept_alone(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.plan import build_plan

    manifest_path = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug", "bag"))
    Image.new("RGB", (96, 96), "red").save(tmp_path / "shop" / "photos" / "bag" / "3.png")  # the bag's big photo
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 96x96 > 2x the guard; the 32x32 photos are under it
    plan = {item.name: item for item in build_plan(load_manifest(manifest_path), "fingerprint")}
    assert plan["mug"].ready
    (problem,) = plan["bag"].problems
    assert problem.path == "concepts[1].images[0]" and "3.png cannot be decoded" in problem.message
    assert "decompression bomb" in problem.message


def test_files_killed_runs_left_are_removed_and_recorded_ones_kept(tmp_path, ray_local):
    import os
    import time

    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug",))
    assert train(manifest).exit_code == 0
    forced = train(manifest, "--force")  # a recorded attempt file beside the first
    assert forced.exit_code == 0, forced.output
    concepts = root / "concepts"
    recorded = sorted(p.name for p in concepts.iterdir())
    assert len(recorded) == 2
    old = time.time() - 2 * 3600
    leftovers = [concepts / ".abc.safetensors.1234.partial", concepts / ("f" * 32 + ".deadbeef.safetensors")]
    fresh = concepts / ".live.safetensors.5678.partial"  # a concurrent run's write in progress
    for path in [*leftovers, fresh]:
        path.write_bytes(b"half")
    for path in [*leftovers, *(concepts / name for name in recorded)]:
        os.utime(path, (old, old))
    again = train(manifest)
    assert again.exit_code == 0 and "removed 2 file(s) that interrupted runs left" in again.output, again.output
    assert sorted(p.name for p in concepts.iterdir()) == sorted([*recorded, fresh.name])


def test_a_300_concept_run_shows_its_running_and_failed_first_with_an_overall_eta():
    import io
    import time

    from rich.console import Console

    from pipeline.index import Status
    from pipeline.progress import LiveDisplay
    from pipeline.train import ConceptState, RunSummary

    summary = RunSummary("big", "/store")
    for i in range(300):
        status = Status.SUCCEEDED if i < 100 else Status.PLANNED
        summary.concepts[f"c{i:03d}"] = ConceptState(f"c{i:03d}", "k", status, seconds=6.0 if i < 100 else None)
    summary.concepts["c250"].status = Status.RUNNING
    summary.concepts["c299"].status, summary.concepts["c299"].error = Status.FAILED, "bad photo"
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=30)
    display = LiveDisplay(console)
    display.summary, display.started = summary, time.time() - 600  # 100 trainings in 10 minutes
    console.print(display._table())
    text = console.file.getvalue()
    lines = text.splitlines()
    assert len(lines) <= 30
    assert "101/300 done (1 failed), 1 running; elapsed 10m00s, ETA 19m54s" in lines[0]
    body = "\n".join(lines[1:])
    assert body.index("c250") < body.index("c299") < body.index("c100")  # running, failed, then waiting
    assert "... 278 more" in body and "178 planned" in body and "100 succeeded" in body


def test_sigterm_mid_run_keeps_the_rows_of_the_concepts_that_finished(tmp_path):
    """A real SIGTERM (a scheduler's timeout, `kill`) to a real run: the concepts that finished keep their
    rows, the one still training has none (a rerun trains it), and every lease is given back. Rows are held
    for an hour before a commit here, so none is committed when the signal comes: only the way out does it."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline.index import COMMIT_SECONDS_ENV

    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug", "bag", "cup"))
    text = manifest.read_text().replace(
        "    superclass: bag\n", "    superclass: bag\n    training: {steps: 100000}\n"
    )  # bag trains until stopped
    manifest.write_text(text)
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(manifest)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {COMMIT_SECONDS_ENV: "3600"},
    )  # fmt: skip
    assert run.stdout is not None
    seen = []
    for line in run.stdout:  # log lines (not a terminal): "  cup: succeeded 1.2s ..."
        seen.append(line)
        if line.startswith("  cup: succeeded"):
            break
    run.send_signal(signal.SIGTERM)
    seen.append(run.communicate(timeout=120)[0])
    assert run.returncode != 0, "".join(seen)
    rows = ConceptIndex(Store(str(root))).rows(["name", "status"]).to_pylist()
    assert sorted(r["name"] for r in rows) == ["cup", "mug"], "".join(seen)
    assert {r["status"] for r in rows} == {"succeeded"}
    assert not Store(str(root)).list("leases")
