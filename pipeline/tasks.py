"""What a training task runs on a Ray worker: one concept, from its images to its file and index row.

Plain functions over plain data (TrainTask in, ConceptRow out), wrapped as Ray tasks by pipeline/train.py,
so they can be unit-tested without Ray. The base model, its C^-1 and the retry decision are
pipeline/worker.py's: bad input becomes a "failed" row with its message; a transient failure is raised as
TransientError for Ray to retry (max_retries), and the driver records the last error if every try fails.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.index import ConceptRow, Status
from pipeline.store import Artifact, Store, sha256_hex
from pipeline.worker import TransientError, describe, is_transient, planned_base, stored_covariance, worker_label


@dataclass(frozen=True)
class TrainTask:
    """Everything one concept's training and its index row need; small and picklable (images travel as
    URIs + hashes, never as pixels)."""

    name: str
    token: str
    superclass: str
    images: tuple[tuple[str, str], ...]  # (uri, sha256)
    masks: tuple[tuple[str, str], ...] | None
    training: dict[str, Any]  # TrainConfig fields; training["method"] picks the method (perfusion.methods)
    selection: Any  # perfusion.SelectConfig (the operating point chosen by a scorer), or None
    concept_key: str
    file: str  # relative to the store root
    base_model: str  # what loads the base (a built-in name or a resolved local path)
    fingerprint: str
    root: str
    covariance: str  # relative path of C in the store
    covariance_sha256: str
    catalog: str
    base_name: str  # the manifest's base_model, as the index records it
    tags: dict[str, Any] = field(default_factory=dict)  # the manifest's tags (str, int, float or bool values)
    manifest_uri: str | None = None
    attempt_id: str = field(default_factory=lambda: uuid.uuid4().hex)


ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def concept_row(
    task: TrainTask,
    status: Status,
    *,
    artifact: Artifact | None = None,
    steps: int | None = None,
    final_loss: float | None = None,
    error: str | None = None,
    seconds: float | None = None,
    device: str | None = None,
    concept: Any = None,
    adopted: bool = False,
) -> ConceptRow:
    """The index row of one attempt: the one place a ConceptRow is made (tasks, and the driver's failures)."""
    from perfusion.methods import method_for

    method = method_for(task.training)
    return ConceptRow(
        concept_key=task.concept_key,
        attempt_id=task.attempt_id,
        catalog=task.catalog,
        name=task.name,
        token=task.token,
        superclass=task.superclass,
        tags=dict(task.tags),
        base_model=task.base_name,
        fingerprint=task.fingerprint,
        method=method.name,
        method_version=method.version,
        file_uri=artifact.path if artifact else None,  # relative to the root: the store stays movable
        sha256=artifact.sha256 if artifact else None,
        bytes=artifact.bytes if artifact else None,
        status=status,
        error=error,
        steps=steps,
        final_loss=final_loss,
        seconds=seconds,
        device=device,
        manifest_uri=task.manifest_uri,
        adopted=adopted,
        **({} if concept is None else operating_point(concept)),
    )


def operating_point(concept: Any) -> dict[str, Any]:
    """The index's operating-point columns of a trained concept, from what its file records."""
    metadata = concept.metadata
    selection = metadata.get("selection") or {}
    seed = selection.get("seed", (metadata.get("train_config") or {}).get("seed"))
    step = metadata.get("selected_step")
    return {
        "selected_step": None if step is None else int(step),
        "selected_seed": None if seed is None else int(seed),
        "beta": getattr(concept, "beta", None),  # a method without a gate has none
        "tau": getattr(concept, "tau", None),
        "selection_score": selection.get("score"),
    }


def train_one(task: TrainTask, progress: ProgressFn | None = None) -> ConceptRow:
    """Train one concept and store its file; returns its row (succeeded, or failed for bad input). A transient
    failure is raised as TransientError (Ray retries the task)."""
    started = time.perf_counter()
    try:
        return _train(task, progress, started)
    except Exception as error:
        if is_transient(error):
            raise TransientError(describe(error)) from error
        seconds = time.perf_counter() - started
        return concept_row(task, Status.FAILED, error=describe(error), seconds=seconds, device=worker_label())


def _train(task: TrainTask, progress: ProgressFn | None, started: float) -> ConceptRow:
    import perfusion

    base = planned_base(task.base_model, task.fingerprint)
    store = Store(task.root)
    adopted = _adopt_existing(store, task, base, started)
    if adopted is not None:  # a previous attempt wrote the file, then died before its row was committed
        return adopted
    # A zero-shot product's onboarding needs no C^-1 (its base has none: task.covariance is "").
    covariance = stored_covariance(store, base, task.covariance, task.covariance_sha256) if task.covariance else None
    images = [_read_checked(uri, sha, task.name) for uri, sha in task.images]  # decoded by the method
    masks = [_read_checked(uri, sha, task.name) for uri, sha in task.masks] if task.masks else None

    def on_step(info: perfusion.StepInfo) -> None:
        if progress is not None:
            progress(info.step, info.steps, info.loss)

    method, config = perfusion.method_for(task.training), perfusion.TrainConfig(**task.training)
    if task.selection is None:
        concept = method.train(
            base, images, task.token, task.superclass, config, masks=masks, covariance=covariance, on_step=on_step
        )
    else:
        from perfusion.selection import train_selected

        assert covariance is not None, "the manifest refuses step selection for zero-shot products"
        concept = train_selected(
            method.train, base, images, task.token, task.superclass, config, task.selection,
            masks=masks, covariance=covariance, on_step=on_step,
        )  # fmt: skip
    concept.metadata["name"] = task.name
    concept.metadata["concept_key"] = task.concept_key
    try:
        artifact = store.write_once(task.file, concept.to_bytes())
    except FileExistsError:  # a racing attempt finished first: its file is as good as ours
        adopted = _adopt_existing(store, task, base, started)
        if adopted is None:
            raise TransientError(f"{store.uri(task.file)} appeared during training and is not usable") from None
        return adopted
    loss = concept.metadata.get("loss") or {}  # none for an onboarded (zero-shot) product
    return concept_row(
        task,
        Status.SUCCEEDED,
        artifact=artifact,
        steps=int(loss["steps"]) if "steps" in loss else None,
        final_loss=loss.get("mean_last_10pct"),
        seconds=time.perf_counter() - started,
        device=worker_label(),
        concept=concept,
    )


def _adopt_existing(store: Store, task: TrainTask, base: Any, started: float) -> ConceptRow | None:
    """A complete, valid file for this concept key -> its row; a damaged one is removed."""
    import perfusion

    if not store.exists(task.file):
        return None
    data = store.read(task.file)
    try:
        concept = perfusion.load_concept_file(data, base, name=store.uri(task.file))
        if concept.token != task.token or concept.metadata.get("concept_key") != task.concept_key:
            raise perfusion.ConceptFileError("the file belongs to another concept")
    except perfusion.ConceptFileError:
        store.remove(task.file)  # never a row points at it (rows follow files), so removing loses nothing
        return None
    loss = concept.metadata.get("loss", {})
    return concept_row(
        task,
        Status.SUCCEEDED,
        artifact=Artifact(store.uri(task.file), sha256_hex(data), len(data), task.file),
        steps=int(loss.get("steps", 0)) or None,
        final_loss=loss.get("mean_last_10pct"),
        seconds=time.perf_counter() - started,
        device=worker_label(),
        concept=concept,
        adopted=True,
    )


def _read_checked(uri: str, sha256: str, name: str) -> bytes:
    """The file's bytes (named by its URI, for errors), refused unless they are the ones the run planned with."""
    import fsspec

    import perfusion
    from perfusion.images import NamedBytes

    with fsspec.open(uri, "rb") as handle:
        data: bytes = handle.read()
    if sha256_hex(data) != sha256:
        raise perfusion.TrainingError(
            f"concept {name!r}: {uri} changed since the run was planned; rerun to plan with the new file"
        )
    return NamedBytes(data, uri)
