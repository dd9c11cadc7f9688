"""`perfusion-batch doctor`: what this environment gives a run, one line per check with a verdict.

    ok    versions     perfusion-batch 0.1.0, python 3.11.7, torch 2.13.0, ray 2.60.0, ...
    warn  gpus         none on this machine: trainings and renders run on CPU here
    FAIL  storage      storage root s3://bucket/x is not writable: AccessDenied ...

Each check reads only what a run would read (the same flags and environment variables) and never prints a
secret: for credentials it says which variables are set, not their values. `fail` means a run would fail;
`warn` means it would run, maybe not as intended.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pipeline.store import Store, StoreError, redact

OK, WARN, FAIL = "ok", "warn", "FAIL"
HTTP_TIMEOUT = 5.0
PACKAGES = ("perfusion-batch", "torch", "ray", "diffusers", "transformers", "deltalake", "fsspec", "s3fs")
# Names only: their values are never read into a message.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # OK, WARN or FAIL
    detail: str

    def line(self) -> str:
        return f"{self.verdict:<5} {self.name:<12} {self.detail}"


def run_checks(
    address: str | None, root: str | None, base_model: str | None, pushgateway: str | None, device: str
) -> list[Check]:
    return [
        versions(),
        ray_cluster(address),
        gpus(device, remote=bool(address)),
        storage(root),
        base(base_model),
        gateway(pushgateway),
    ]


def versions() -> Check:
    found = [f"python {platform.python_version()}"]
    missing = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        return Check("versions", FAIL, f"not installed: {', '.join(missing)} (pip install -e .); {', '.join(found)}")
    return Check("versions", OK, ", ".join(found))


def ray_cluster(address: str | None) -> Check:
    """The job API at `address` (what --address submits to), asked for its version with the auth token."""
    if not address:
        return Check("ray", OK, f"no address: runs start an embedded Ray on this machine ({os.cpu_count()} CPUs)")
    request = urllib.request.Request(address.rstrip("/") + "/api/version")
    token = auth_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    shown = redact(address)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            info = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            hint = "set RAY_AUTH_TOKEN to the cluster's token" if not token else "RAY_AUTH_TOKEN is not this cluster's"
            return Check("ray", FAIL, f"{shown} refused the request ({error.code}): {hint}")
        return Check("ray", FAIL, f"{shown} answered {error.code}: is it a Ray dashboard (http://HEAD:8265)?")
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return Check("ray", FAIL, f"{shown} not reachable: {reason}; check the address (http://HEAD:8265)")
    version = info.get("ray_version", "?")
    local = importlib.metadata.version("ray")
    if version != local:
        return Check("ray", WARN, f"Ray {version} at {shown}, but ray {local} here: use the same version on both")
    return Check("ray", OK, f"Ray {version} at {shown}: job API reachable" + (" (token accepted)" if token else ""))


def auth_token() -> str | None:
    """The token Ray's job client would send: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else
    ~/.ray/auth_token (the same order as Ray's own lookup)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def gpus(device: str, remote: bool = False) -> Check:
    """GPUs of THIS machine; with --address the cluster's workers are not visible from here."""
    import torch

    where = " (the cluster's own GPUs: see its dashboard)" if remote else ""

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        detail = f"{len(names)} on this machine: {names[0]} ({memory:.0f} GiB){where}"
        if device == "cpu":
            return Check("gpus", WARN, detail + "; but PERFUSION_BATCH_DEVICE/--device is cpu: they stay unused")
        return Check("gpus", OK, detail)
    if device == "gpu":
        return Check("gpus", OK, "none on this machine; --device gpu: tasks wait for the cluster's GPU workers")
    if remote:
        return Check("gpus", OK, f"none on this machine, which only submits{where}")
    return Check("gpus", WARN, "none on this machine: trainings and renders run on CPU here")


def storage(root: str | None) -> Check:
    set_names = [name for name in CREDENTIAL_VARIABLES if os.environ.get(name)]
    credentials = f"; credentials from the environment: {', '.join(set_names)}" if set_names else ""
    if not root:
        return Check("storage", WARN, "no root given (--root, PERFUSION_BATCH_ROOT or --manifest): not checked")
    try:
        store = Store(root)
        store.check_writable()
    except StoreError as error:
        return Check("storage", FAIL, f"{error}{credentials}")
    return Check("storage", OK, f"{redact(store.root)} is writable{credentials}")


def base(spec: str | None) -> Check:
    if not spec:
        return Check("base model", WARN, "none given (--base or --manifest): not checked")
    import perfusion

    started = time.perf_counter()
    try:
        model = perfusion.load_base(spec)
    except Exception as error:  # any loader error is the verdict, with its message
        return Check("base model", FAIL, f"{spec!r} does not load: {error}")
    seconds = time.perf_counter() - started
    return Check("base model", OK, f"{spec!r} loads in {seconds:.1f}s (fingerprint {model.fingerprint[:12]})")


def gateway(address: str | None) -> Check:
    if not address:
        return Check("pushgateway", OK, "not configured: no run summary is pushed")
    if "://" not in address:
        address = f"http://{address}"  # as prometheus_client does for host:port
    shown = redact(address)
    try:
        with urllib.request.urlopen(address.rstrip("/") + "/-/healthy", timeout=HTTP_TIMEOUT) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return Check("pushgateway", FAIL, f"{shown} not reachable: {reason}; summaries would be lost")
    return Check("pushgateway", OK, f"{shown} is healthy")
