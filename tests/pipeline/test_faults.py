"""Faults: a worker killed mid-training is retried by Ray, a render actor killed mid-job is restarted and every
image is still rendered once; the run summary reaches a real Pushgateway-like HTTP receiver, and nothing is pushed
when none is configured."""

from __future__ import annotations

import threading
import time

import psutil
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.index import ConceptIndex, RenderIndex
from pipeline.store import Store
from tests.helpers import http_receiver
from tests.pipeline.conftest import write_catalog

runner = CliRunner()


def kill_first_process(title: str, killed: list[int], deadline: float) -> None:
    """SIGKILL the first process Ray titled `title...` (a worker or actor at work), like an OOM kill."""
    while time.monotonic() < deadline and not killed:
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if cmdline.startswith(title):
                process.kill()
                killed.append(process.info["pid"])
                return
        time.sleep(0.05)


def test_a_killed_worker_is_retried_and_the_concept_still_trains(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug",))
    manifest.write_text(manifest.read_text().replace("steps: 4,", "steps: 150,"))  # long enough to be hit
    killed: list[int] = []
    killer = threading.Thread(target=kill_first_process, args=("ray::train_task", killed, time.monotonic() + 60))
    killer.start()
    result = runner.invoke(app, ["train", str(manifest)])
    killer.join()
    assert killed, "the test never found a training worker to kill"
    assert result.exit_code == 0, result.output
    (row,) = ConceptIndex(Store(str(root))).latest(status=None)
    assert row["status"] == "succeeded" and row["steps"] == 150


def test_embedded_workers_run_at_the_callers_priority(ray_local):
    """Ray's default worker niceness (15) lets any other busy process starve the training it was asked to run."""
    import os

    def niceness() -> int:
        return os.nice(0)

    assert ray_local.get(ray_local.remote(niceness).remote()) == os.nice(0)


def test_a_killed_render_actor_is_restarted_and_every_image_is_rendered(tmp_path, ray_local):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug",))
    renders = "renders:\n  - name: shots\n    prompts: ['a photo of {a}']\n    images_per_prompt: 24\n    steps: 30\n"
    manifest.write_text(manifest.read_text() + renders)
    assert runner.invoke(app, ["train", str(manifest)]).exit_code == 0
    killed: list[int] = []
    # the actor's constructor arguments (the covariance) live in Ray's object store: a restart must find them
    title = "ray::MapWorker(MapBatches(Renderer))"
    killer = threading.Thread(target=kill_first_process, args=(title, killed, time.monotonic() + 120))
    killer.start()
    result = runner.invoke(app, ["render", str(manifest)])
    killer.join()
    assert killed, "the test never found a render actor to kill"
    assert result.exit_code == 0, result.output
    assert "rendered 24, skipped 0 (already rendered), failed 0" in result.output
    rows = RenderIndex(Store(str(root))).of_job("shots")
    assert len(rows) == 24 and {r["status"] for r in rows} == {"succeeded"}
    assert len({r["render_id"] for r in rows}) == 24  # a retried batch adds no second row


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
