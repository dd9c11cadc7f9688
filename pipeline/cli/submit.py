"""A run submitted as a Ray Job: `perfusion-batch COMMAND MANIFEST FLAGS...` on the cluster, followed here.

The flags are rebuilt from the same options object the local run would take (jobs.options_argv), so a
submitted run is the run asked for; the manifest's folder travels as the job's working_dir (the images
beside it come along).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from pipeline.store import ROOT_ENV

if TYPE_CHECKING:
    from pipeline.manifest import Manifest


def cluster_to_submit_to(address: str | None) -> str | None:
    """The cluster to submit this run to as a Ray Job, if any. None inside a Ray Job: its driver is on the
    cluster already (RAY_API_SERVER_ADDRESS set in a pod's environment must not make it submit itself again)."""
    from pipeline import jobs

    return None if not address or jobs.inside_ray_job() else address


def submit(spec: Manifest, manifest: str, address: str, command: str, options: Any) -> None:
    """Run COMMAND with `options` as a Ray Job on the cluster at `address`; exit with the job's status."""
    from pipeline import jobs

    folder = os.path.dirname(os.path.abspath(manifest)) if "://" not in manifest else None
    argv = [os.path.basename(manifest) if folder else manifest, *jobs.options_argv(options)]
    root_uri = spec.storage_root(options.root)
    if "://" not in root_uri or root_uri.startswith("file://"):
        typer.secho(
            f"warning: storage root {root_uri!r} is a local path: on a cluster it is the job's working folder, "
            "which is discarded; pass --root s3://... (or gs://) to keep the results",
            fg="yellow",
            err=True,
        )
    runtime_env: dict[str, object] = {"working_dir": folder} if folder else {}
    env_vars = {k: os.environ[k] for k in (ROOT_ENV,) if os.environ.get(k)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    text = Path(manifest).read_text(encoding="utf-8") if folder else manifest
    job_id = jobs.submission_id(command, spec.catalog, text, argv)
    outcome = jobs.submit_and_follow(
        address,
        entrypoint=f"perfusion-batch {command} " + " ".join(shlex.quote(a) for a in argv),
        base_id=job_id,
        metadata={
            "job_name": f"perfusion-batch {command} {spec.catalog}",  # the dashboard's Name column
            "catalog": spec.catalog,
            "manifest": os.path.basename(manifest),
            "command": command,
        },
        runtime_env=runtime_env,
    )
    typer.echo(f"Ray job {job_id}: {outcome.status}")
    if outcome.status != "SUCCEEDED":
        # The entrypoint's own code (1: some items failed; 2: bad input, nothing ran), else 1 (stopped, lost).
        raise typer.Exit(code=outcome.exit_code if outcome.exit_code in (1, 2) else 1)
