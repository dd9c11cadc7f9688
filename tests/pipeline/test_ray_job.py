"""`perfusion-batch train --address URL` against a real Ray head (`ray start --head` with its own temp dir,
token auth on, stopped by its process group id): the run is submitted as a Ray Job, its logs are followed,
and the exit code is the job's."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from pipeline.index import ConceptIndex, RenderIndex
from pipeline.store import Store
from tests.pipeline.conftest import write_catalog


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclasses.dataclass
class Head:
    address: str  # the dashboard: Ray Job submission
    metrics_url: str  # Prometheus text from the node's metrics agent (what a PodMonitor scrapes)


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    port, dashboard, metrics = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            # Its own agent and metrics ports: the embedded test Ray on this host holds the defaults.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={metrics}",
        ],
        # Workers report metrics every second instead of every 10 s, so the scrape below sees them soon.
        # RAY_API_SERVER_ADDRESS in the head's environment (as a pod's ConfigMap might put it there) reaches
        # every job's driver: the CLI must run the job there, not submit it again (to a dead address here).
        env=os.environ
        | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_metrics_report_interval_ms": "1000",
            "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: we stop exactly what we started
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            break
        except OSError:
            if time.monotonic() > deadline or head.poll() is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not come up")
            time.sleep(1)
    yield Head(address, f"http://127.0.0.1:{metrics}/metrics")
    # A graceful stop takes ~30 s (Ray waits out each process's grace period); the test's data is already
    # checked, so after a short grace the whole process group goes at once.
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command in its own process (a Ray client keeps its auth token per process, and this test
    process may already host the embedded test Ray with a token of its own)."""
    command = [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ | (env or {}))


@pytest.mark.slow
def test_train_is_submitted_as_a_ray_job_and_followed(tmp_path, ray_head):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", "./store", names=("mug",))
    manifest.write_text(manifest.read_text() + "renders:\n  - {name: shots, prompts: ['a photo of {a}'], steps: 2}\n")
    # Rendering before training: the job's driver exits 2 (nothing rendered), and so does the CLI here.
    early = cli("render", str(manifest), "--address", ray_head.address, "--root", str(root))
    assert early.returncode == 2, early.stdout + early.stderr
    assert "concept 'mug' is not trained yet" in early.stdout + early.stderr
    result = cli("train", str(manifest), "--address", ray_head.address, "--root", str(root))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "submitted Ray job perfusion-train-test-shop-" in output
    assert "test-shop: trained 1, skipped 0" in output  # the job's own log, streamed
    assert result.stdout.rstrip().endswith("SUCCEEDED")
    assert [r["name"] for r in ConceptIndex(Store(str(root))).latest()] == ["mug"]
    names = subprocess.run(  # its own process: a Ray client keeps its auth token per process (see cli)
        [
            sys.executable,
            "-c",
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "jobs = C(sys.argv[1]).list_jobs(); "
            "print({j.metadata.get('job_name') for j in jobs if j.metadata.get('command') == 'train'})",
            ray_head.address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert names.stdout.strip() == "{'perfusion-batch train test-shop'}", names.stderr[-500:]  # the Name column

    again = cli("train", str(manifest), "--address", ray_head.address, "--root", str(root))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trained 0, skipped 1" in again.stdout  # a new job (same id family), nothing retrained

    # The training task's ray.util.metrics reach the node's Prometheus endpoint.
    deadline = time.monotonic() + 60
    while True:
        text = urllib.request.urlopen(ray_head.metrics_url, timeout=5).read().decode()
        counted = [line for line in text.splitlines() if line.startswith("ray_perfusion_concepts_total{")]
        if counted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert any('status="succeeded"' in line and line.rstrip().endswith(" 1.0") for line in counted), counted
    steps = [line for line in text.splitlines() if line.startswith("ray_perfusion_training_steps_total")]
    assert steps and float(steps[0].split()[-1]) == 4.0, steps

    # The render command goes the same way: a Ray Job whose Ray Data actors run on the cluster.
    rendered = cli("render", str(manifest), "--address", ray_head.address, "--root", str(root))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert "submitted Ray job perfusion-render-test-shop-" in rendered.stdout + rendered.stderr
    assert "rendered 1, skipped 0 (already rendered), failed 0" in rendered.stdout
    assert len(RenderIndex(Store(str(root))).of_job("shots")) == 1

    # SIGTERM to the following CLI (a CronJob's activeDeadlineSeconds) stops the Ray job itself.
    slow = manifest.with_name("slow.yaml")
    slow.write_text(manifest.read_text().replace("steps: 2}", "steps: 500, images_per_prompt: 16}"))
    follower = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "render", str(slow), "--address", ray_head.address, "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job_id = None
    assert follower.stdout is not None
    for line in follower.stdout:
        if line.startswith("submitted Ray job "):
            job_id = line.split()[3]
            break
    assert job_id, "the render was never submitted"
    time.sleep(3)
    follower.send_signal(signal.SIGTERM)
    rest = follower.communicate(timeout=60)[0]
    assert follower.returncode == 128 + signal.SIGTERM and f"stopping Ray job {job_id}" in rest
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    deadline = time.monotonic() + 30
    while True:
        shown = subprocess.run(
            [ray_bin, "job", "status", "--address", ray_head.address, job_id], capture_output=True, text=True
        )
        status = shown.stdout + shown.stderr
        if f"Job '{job_id}' was stopped" in status or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert f"Job '{job_id}' was stopped" in status, status

    # doctor: the job API answers with the token, and refuses a wrong one (the token itself is never shown).
    doctor = cli("doctor", "--address", ray_head.address, "--root", str(root))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok    ray          Ray 2." in doctor.stdout and "(token accepted)" in doctor.stdout
    wrong = cli("doctor", "--address", ray_head.address, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 1 and "FAIL  ray" in wrong.stdout and "is not this cluster's" in wrong.stdout
    assert os.environ["RAY_AUTH_TOKEN"] not in doctor.stdout + wrong.stdout and "not-the-token" not in wrong.stdout
