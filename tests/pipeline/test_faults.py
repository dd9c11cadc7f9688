"""Faults: a worker killed mid-training is retried by Ray; the run summary reaches a real Pushgateway-like
HTTP receiver, and nothing is pushed when none is configured."""

from __future__ import annotations

import threading
import time

import psutil
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.index import ConceptIndex
from pipeline.store import Store
from tests.helpers import http_receiver
from tests.pipeline.conftest import write_catalog

runner = CliRunner()


def kill_first_training_worker(killed: list[int], deadline: float) -> None:
    """SIGKILL the first process Ray titled `ray::train_task` (a worker mid-task), like an OOM kill."""
    while time.monotonic() < deadline and not killed:
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if cmdline.startswith("ray::train_task"):
                process.kill()
                killed.append(process.info["pid"])
                return
        time.sleep(0.05)


def test_a_killed_worker_is_retried_and_the_concept_still_trains(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug",))
    manifest.write_text(manifest.read_text().replace("steps: 4,", "steps: 150,"))  # long enough to be hit
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_training_worker, args=(killed, time.monotonic() + 60))
    killer.start()
    result = runner.invoke(app, ["train", str(manifest)])
    killer.join()
    assert killed, "the test never found a training worker to kill"
    assert result.exit_code == 0, result.output
    (row,) = ConceptIndex(Store(str(root))).latest(status=None)
    assert row["status"] == "succeeded" and row["steps"] == 150


def test_the_run_summary_is_pushed_only_when_configured(tmp_path, ray_local, monkeypatch):
    monkeypatch.delenv("PERFUSION_BATCH_PUSHGATEWAY", raising=False)
    manifest = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug",))
    with http_receiver() as (gateway, received):
        assert runner.invoke(app, ["train", str(manifest), "--dry-run"]).exit_code == 0
        assert runner.invoke(app, ["train", str(manifest)]).exit_code == 0
        assert received == []  # no gateway configured: nothing pushed
        result = runner.invoke(app, ["train", str(manifest), "--pushgateway", gateway])
        assert result.exit_code == 0, result.output
    ((method, path, body),) = received
    assert method == "POST"  # pushadd: a failed run would keep the last success time
    assert path == "/metrics/job/perfusion-batch-train/catalog/test-shop"
    text = body.decode()
    assert 'perfusion_batch_job_concepts{status="skipped"} 1.0' in text
    assert "perfusion_batch_job_last_success_timestamp_seconds" in text
    assert "perfusion_batch_job_duration_seconds" in text
