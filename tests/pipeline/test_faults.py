"""Faults: a worker killed mid-training is retried by Ray, a render actor killed mid-job is restarted and every
image is still rendered once, a 30 s storage outage mid-train and mid-render is waited out; the run summary
reaches a real Pushgateway-like HTTP receiver, and nothing is pushed when none is configured."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import boto3
import psutil
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.index import ConceptIndex, RenderIndex
from pipeline.store import Store
from tests.helpers import CuttableProxy, http_receiver
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


OUTAGE_SECONDS = 30


def test_a_30_second_storage_outage_mid_train_and_mid_render_is_ridden_out(tmp_path, s3_endpoint, ray_local):
    """Real processes against the real S3 server, through a proxy cut for 30 s while a training and a render
    are at work: both wait the outage out (storage retries with backoff) and finish, every concept trained
    once and every image rendered once."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="outage")
    shots = write_catalog(tmp_path / "shots", "s3://outage/shots", names=("mug", "bag"))
    shots.write_text(
        shots.read_text()
        + "renders:\n  - {name: shots, prompts: ['a photo of {a}', '{a} next to {b}'], steps: 10,"
        + " images_per_prompt: 4}\n"
    )
    assert runner.invoke(app, ["train", str(shots)]).exit_code == 0  # the render's concepts, before the outage
    fresh = write_catalog(tmp_path / "fresh", "s3://outage/fresh", names=("mug", "bag", "cup"))
    fresh.write_text(fresh.read_text().replace("steps: 4,", "steps: 40,"))  # at work when the cut comes
    host, port = s3_endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    env = os.environ | {"AWS_ENDPOINT_URL": proxy.endpoint}
    lines: dict[str, list[tuple[float, str]]] = {"train": [], "render": []}
    runs = {}
    for command, manifest in (("train", fresh), ("render", shots)):
        runs[command] = subprocess.Popen(
            [sys.executable, "-m", "pipeline", command, str(manifest)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=_collect, args=(runs[command], lines[command]), daemon=True).start()
    try:
        # At work: the training reports steps, the render has planned its images (its actors start next).
        deadline = time.monotonic() + 240
        while not (_said(lines["train"], " step ") and _said(lines["render"], "  rendered 0/")):
            assert time.monotonic() < deadline and all(r.poll() is None for r in runs.values()), lines
            time.sleep(0.2)
        proxy.cut()
        cut_at = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        proxy.restore()
        codes = {command: run.wait(timeout=400) for command, run in runs.items()}
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
        proxy.close()
    output = {command: "".join(line for _, line in lines[command]) for command in runs}
    assert codes == {"train": 0, "render": 0}, output
    assert proxy.refused > 0  # the outage was felt
    # Both were mid-run: each finished its work after the outage began.
    assert _when(lines["train"], "test-shop: trained 3, skipped 0 (already trained), failed 0") > cut_at, output
    assert _when(lines["render"], "test-shop: rendered 12, skipped 0 (already rendered), failed 0") > cut_at, output
    rows = ConceptIndex(Store("s3://outage/fresh")).rows(["name", "status"]).to_pylist()
    assert sorted((r["name"], r["status"]) for r in rows) == [
        ("bag", "succeeded"),
        ("cup", "succeeded"),
        ("mug", "succeeded"),
    ]
    images = RenderIndex(Store("s3://outage/shots")).of_job("shots")
    assert len(images) == 12 and len({r["render_id"] for r in images}) == 12


def _collect(run: subprocess.Popen[str], into: list[tuple[float, str]]) -> None:
    assert run.stdout is not None
    for line in run.stdout:
        into.append((time.monotonic(), line))


def _when(lines: list[tuple[float, str]], text: str) -> float:
    """When the first line holding text was printed."""
    return next(at for at, line in lines if text in line)


def _said(lines: list[tuple[float, str]], text: str) -> bool:
    return any(text in line for _, line in list(lines))
