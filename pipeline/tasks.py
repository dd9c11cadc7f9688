"""What runs on a Ray worker: prepare a base model (fingerprint, vocabulary, C^-1) and train one concept.

Plain functions over plain data (TrainTask in, a row dict out), wrapped as Ray tasks by pipeline/train.py,
so they can be unit-tested without Ray. A worker process keeps its loaded base model between tasks (one at
a time), so a GPU that trains 500 concepts loads the UNet once, not 500 times.

Failure policy:
- bad input (a PerfusionError or ValueError: a corrupt image, a superclass the tokenizer cannot encode, a
  changed base model): the task returns a "failed" row with the message; retrying would fail the same way.
- anything else (storage hiccups, a worker that dies): raised as RetryableTaskError, or the process is
  gone, and Ray retries the task (max_retries); the driver records the last error if every try fails.
"""

from __future__ import annotations

import contextlib
import io
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipeline.index import Status
from pipeline.store import Store, covariance_file, sha256_hex


class RetryableTaskError(Exception):
    """Raised inside a task for a failure a retry may fix; Ray retries these (retry_exceptions)."""


@dataclass(frozen=True)
class TrainTask:
    """Everything one concept's training needs; small and picklable (images travel as URIs + hashes)."""

    name: str
    token: str
    superclass: str
    images: tuple[tuple[str, str], ...]  # (uri, sha256)
    masks: tuple[tuple[str, str], ...] | None
    training: dict[str, Any]
    concept_key: str
    file: str  # relative to the store root
    base_model: str
    fingerprint: str
    root: str
    covariance: str  # relative path of C in the store
    covariance_sha256: str
    attempt_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class BaseInfo:
    fingerprint: str
    vocabulary: frozenset[str]  # the base tokenizer's words (concept tokens must not collide)
    covariance: str  # its file under the store root
    covariance_sha256: str  # '' when planning found none stored yet (prepare_base(write=False))
    device: str


ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)

_BASES: dict[str, Any] = {}  # spec -> perfusion.BaseModel; one per worker process


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_base(spec: str) -> Any:
    """The base model for `spec`, loaded once per worker process (fp16 on a GPU, fp32 on CPU)."""
    if spec not in _BASES:
        import torch

        import perfusion

        _BASES.clear()  # one base per process: a GPU has room for one UNet, not every base ever used
        cuda = torch.cuda.is_available()
        _BASES[spec] = perfusion.load_base(
            spec, device="cuda" if cuda else "cpu", dtype=torch.float16 if cuda else None
        )
    return _BASES[spec]


def prepare_base(spec: str, root: str, write: bool = True) -> BaseInfo:
    """Load the base model, and find its covariance in the store or estimate it once and store it.
    write=False (planning: validate, --dry-run) stores nothing: a covariance not stored yet has sha256 ''."""
    import perfusion

    base = worker_base(spec)
    store = Store(root)
    relative = covariance_file(base.fingerprint)
    tokenizer = base.tokenizer
    base_words = frozenset(w for w, i in tokenizer.get_vocab().items() if i < tokenizer.vocab_size)
    if not store.exists(relative):
        if not write:
            return BaseInfo(base.fingerprint, base_words, relative, "", device_name())
        data = perfusion.covariance_to_bytes(perfusion.estimate_covariance(base))
        # Another run may have stored it first: then use theirs (same base, same C up to float rounding).
        with contextlib.suppress(FileExistsError):
            store.write_once(relative, data)
    data = store.read(relative)
    perfusion.covariance_from_bytes(data, base.fingerprint, label=store.uri(relative))  # validate it
    return BaseInfo(base.fingerprint, base_words, relative, sha256_hex(data), device_name())


def train_one(task: TrainTask, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train one concept and store its file; returns its index row (status succeeded or failed)."""
    import perfusion

    started = time.perf_counter()
    row = base_row(task)
    try:
        base = worker_base(task.base_model)
        if base.fingerprint != task.fingerprint:
            raise perfusion.BaseModelError(
                f"base model {task.base_model!r} on this worker has fingerprint {base.fingerprint[:12]}, the run "
                f"planned {task.fingerprint[:12]}: every worker must see the same weights"
            )
        store = Store(task.root)
        adopted = _adopt_existing(store, task, base)
        if adopted is not None:  # a previous attempt wrote the file, then died before its row was committed
            return row | adopted | {"seconds": time.perf_counter() - started}
        covariance = perfusion.covariance_from_bytes(
            store.read(task.covariance, task.covariance_sha256), base.fingerprint, label=store.uri(task.covariance)
        )
        images = [_read_image(uri, sha, "RGB", task.name) for uri, sha in task.images]
        masks = [_read_image(uri, sha, "L", task.name) for uri, sha in task.masks] if task.masks else None
        config = perfusion.TrainConfig(**task.training)

        def on_step(info: perfusion.StepInfo) -> None:
            if progress is not None:
                progress(info.step, info.steps, info.loss)

        concept = perfusion.train_concept(
            base, images, task.token, task.superclass, config, masks=masks, covariance=covariance, on_step=on_step
        )
        concept.metadata["name"] = task.name
        concept.metadata["concept_key"] = task.concept_key
        data = concept.to_bytes()
        try:
            artifact = store.write_once(task.file, data)
        except FileExistsError:  # a racing attempt finished first: its file is as good as ours
            adopted = _adopt_existing(store, task, base)
            if adopted is None:
                raise RetryableTaskError(f"{store.uri(task.file)} appeared during training and is not usable") from None
            return row | adopted | {"seconds": time.perf_counter() - started}
        loss = concept.metadata["loss"]
        return row | {
            "status": Status.SUCCEEDED,
            "file_uri": artifact.uri,
            "sha256": artifact.sha256,
            "bytes": artifact.bytes,
            "steps": int(loss["steps"]),
            "final_loss": loss["mean_last_10pct"],
            "seconds": time.perf_counter() - started,
        }
    except (perfusion.PerfusionError, ValueError) as error:
        return row | {"status": Status.FAILED, "error": str(error), "seconds": time.perf_counter() - started}
    except RetryableTaskError:
        raise
    except OSError as error:  # storage and network trouble: worth another try
        raise RetryableTaskError(f"{type(error).__name__}: {error}") from error


def base_row(task: TrainTask) -> dict[str, Any]:
    """The index-row fields a task knows before it runs (status 'failed' until it succeeds)."""
    return {
        "concept_key": task.concept_key,
        "attempt_id": task.attempt_id,
        "name": task.name,
        "token": task.token,
        "superclass": task.superclass,
        "fingerprint": task.fingerprint,
        "device": f"{device_name()}@{platform.node()}",
        "status": Status.FAILED,
        "error": None,
    }


def _adopt_existing(store: Store, task: TrainTask, base: Any) -> dict[str, Any] | None:
    """A complete, valid file for this concept key -> the row fields for it; a damaged one is removed."""
    import perfusion

    if not store.exists(task.file):
        return None
    data = store.read(task.file)
    try:
        concept = perfusion.load_concept(data, base, name=store.uri(task.file))
        if concept.token != task.token or concept.metadata.get("concept_key") != task.concept_key:
            raise perfusion.ConceptFileError("the file belongs to another concept")
    except perfusion.ConceptFileError:
        store.remove(task.file)  # never a row points at it (rows follow files), so removing loses nothing
        return None
    loss = concept.metadata.get("loss", {})
    return {
        "status": Status.SUCCEEDED,
        "file_uri": store.uri(task.file),
        "sha256": sha256_hex(data),
        "bytes": len(data),
        "steps": int(loss.get("steps", 0)) or None,
        "final_loss": loss.get("mean_last_10pct"),
    }


def _read_image(uri: str, sha256: str, mode: str, name: str) -> Image.Image:
    import fsspec

    import perfusion

    with fsspec.open(uri, "rb") as handle:
        data = handle.read()
    if sha256_hex(data) != sha256:
        raise perfusion.TrainingError(
            f"concept {name!r}: {uri} changed since the run was planned; rerun to plan with the new file"
        )
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
        return picture.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise perfusion.TrainingError(f"concept {name!r}: {uri} is not a readable image ({error})") from None
