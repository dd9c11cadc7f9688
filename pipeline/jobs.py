"""Where a run executes: an embedded local Ray, the cluster a Ray Job runs in, or a Ray Job we submit.

- `ensure_ray()`: inside a Ray Job (RAY_ADDRESS is set by the job supervisor) connect to that cluster;
  otherwise start an embedded local Ray (`ray.init(address="local")`): no cluster, nothing to install.
- `submit_and_follow(address, ...)`: `perfusion-batch train --address URL` submits the same command as a
  Ray Job (deterministic submission id, runtime env, metadata naming the manifest), streams its logs and
  returns its final status and the entrypoint's exit code, so the CLI's exit code is the job's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

AGENT_WAIT_SECONDS = 60.0
DEVICES = ("auto", "gpu", "cpu")
__all__ = [
    "DEVICES",
    "JobOutcome",
    "ensure_ray",
    "flag",
    "inside_ray_job",
    "options_argv",
    "remote",
    "slots",
    "submission_id",
    "submit_and_follow",
    "task_resources",
]


def flag(default: Any, name: str) -> Any:
    """A run-options field that the command line sets with `name` (options_argv rebuilds it from the field)."""
    return field(default=default, metadata={"flag": name})


def options_argv(options: Any) -> list[str]:
    """The command-line flags that give a run these options (TrainOptions, RenderOptions): what a submitted
    Ray Job's entrypoint needs to run exactly the run asked for here. Fields at their default are left out,
    so the cluster's own defaults (e.g. PERFUSION_BATCH_DEVICE) decide them there."""
    argv: list[str] = []
    for spec in fields(options):
        name, value = spec.metadata.get("flag"), getattr(options, spec.name)
        if name is None or value == spec.default:
            continue
        if isinstance(value, bool):
            argv.append(name)
        elif isinstance(value, tuple):
            argv += [part for item in value for part in (name, str(item))]
        else:
            argv += [name, str(value)]
    return argv


def inside_ray_job() -> bool:
    """True in the driver of a Ray Job (the entrypoint's process), where the cluster is already at hand.
    Ray's job supervisor gives every entrypoint RAY_JOB_CONFIG_JSON_ENV_VAR (and RAY_ADDRESS=the GCS);
    KubeRay's submitter pod has RAY_JOB_SUBMISSION_ID."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_SUBMISSION_ID"))


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect once per process: to the job's cluster when running as a Ray Job, else an embedded Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, configure_logging=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,  # the driver shows progress itself; worker logs stay in Ray's log folder
            configure_logging=False,
            # Ray starts workers at niceness 15 to keep a cluster node's daemons responsive. Here the workers
            # ARE the command the user ran: at 15, any other busy process on the machine starves them (two busy
            # loops on 2 cores cut a training worker to ~2% CPU, a 20 s job ran for minutes).
            _system_config={"worker_niceness": 0},
        )


def remote(function: Callable[..., Any], **options: Any) -> Any:
    """`ray.remote(function).options(...)` without decorating at import time (importing stays Ray-free)."""
    import ray

    return ray.remote(function).options(**options)


def task_resources(device: str, gpus: float) -> dict[str, float]:
    """Ray resources for one training task or renderer actor.

    auto: a GPU share (`gpus`) when the cluster has GPUs now, else one CPU. gpu: a GPU share even when the
    cluster has none yet, so an autoscaling GPU group (KubeRay, min 0 workers) is scaled up for the work.
    cpu: one CPU, GPUs or not."""
    import ray

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if device == "gpu" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0):
        return {"num_gpus": gpus, "num_cpus": 1}
    return {"num_cpus": 1}


def slots(resources: dict[str, Any]) -> int:
    """How many tasks with these resources the cluster can run at once now."""
    import ray

    available = ray.cluster_resources()
    counts = [int(available.get(_ray_name(k), 0) // v) for k, v in resources.items() if v]
    return max(1, min(counts)) if counts else 1


def _ray_name(option: str) -> str:
    return {"num_cpus": "CPU", "num_gpus": "GPU"}.get(option, option)


class _ProgressBoard:
    """A tiny actor the training tasks report (step, steps, loss) to; the driver polls it for the display."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, int, float]] = {}

    def update(self, name: str, step: int, steps: int, loss: float) -> None:
        self.latest[name] = (step, steps, loss)

    def snapshot(self) -> dict[str, tuple[int, int, float]]:
        return dict(self.latest)


class _LazyActor:
    def __init__(self, cls: type) -> None:
        self.cls = cls

    def remote(self) -> Any:
        import ray

        return ray.remote(num_cpus=0)(self.cls).remote()


ProgressBoard = _LazyActor(_ProgressBoard)


# -- remote submission -------------------------------------------------------------------------------------


def submission_id(command: str, catalog: str, manifest_text: str, argv: list[str]) -> str:
    """Same command + manifest + flags -> same id, so a scheduler that fires twice does not start two jobs."""
    digest = hashlib.sha256((manifest_text + "\0" + "\0".join(argv)).encode()).hexdigest()[:12]
    return f"perfusion-{command}-{catalog}-{digest}"


@dataclass(frozen=True)
class JobOutcome:
    status: str  # SUCCEEDED, FAILED, STOPPED, ...
    exit_code: int | None  # the entrypoint's exit code, when it ran to the end


def submit_and_follow(
    address: str,
    entrypoint: str,
    base_id: str,
    metadata: dict[str, str],
    runtime_env: dict[str, Any],
    echo: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> JobOutcome:
    """Submit (or re-attach to) the job and stream its logs until it ends.

    SIGTERM (what Kubernetes sends at a CronJob's activeDeadlineSeconds, or a scheduler's timeout) stops the
    Ray job before this process exits, so a deadline really ends the run; Ctrl-C only stops following."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = _free_or_running_id(client, base_id)
    existing = _status(client, job_id)
    if existing is None:
        _submit_when_ready(client, entrypoint, job_id, runtime_env, metadata)
        echo(f"submitted Ray job {job_id} to {address}\n")
    else:
        echo(f"Ray job {job_id} is already {existing.value}: following it\n")

    def stop_on_sigterm(signum: int, frame: Any) -> None:
        echo(f"\nSIGTERM: stopping Ray job {job_id}\n")
        client.stop_job(job_id)
        raise SystemExit(128 + signum)

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            echo(lines)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm) if in_main_thread else None
    try:
        try:
            asyncio.run(follow())
        except Exception as error:
            echo(f"(log stream ended: {error})\n")
        deadline = time.monotonic() + 30
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    exit_code = getattr(client.get_job_info(job_id), "driver_exit_code", None)
    return JobOutcome(str(status.value if isinstance(status, JobStatus) else status), exit_code)


def _submit_when_ready(
    client: Any, entrypoint: str, job_id: str, runtime_env: dict[str, Any], metadata: dict[str, str]
) -> None:
    """Submit; a head that just started answers "No available agent" until its job agent is up: wait."""
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env, metadata=metadata)
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _status(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_status(job_id)
    except RuntimeError:  # "Job ... does not exist"
        return None


def _free_or_running_id(client: Any, base_id: str) -> str:
    """base_id if unused or still running; after a finished job with that id, base_id-2, -3, ..."""
    candidate, attempt = base_id, 1
    while True:
        status = _status(client, candidate)
        if status is None or not status.is_terminal():
            return candidate
        attempt += 1
        candidate = f"{base_id}-{attempt}"
