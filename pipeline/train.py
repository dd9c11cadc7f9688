"""The training run: manifest -> plan -> one Ray task per concept -> concept files + index rows.

    run = TrainRun(manifest, TrainOptions(...))
    summary = run.execute(display)          # display: pipeline.progress.Display (live table or log lines)

1. A `prepare_base` task loads the base model where the GPUs are, computes its fingerprint and finds (or
   computes once and stores) its C^-1 under covariance/{fingerprint}.
2. The plan (pipeline/plan.py): images read and hashed, a concept_key per concept. Keys with a successful
   row in the index are skipped (idempotent; a run killed midway resumes), unless --force.
3. One task per remaining concept, at most `max_concurrency` in flight, each asking for `gpus_per_task`
   GPUs when the cluster has GPUs (or with --device gpu) and one CPU otherwise. Ray retries crashed
   workers and RetryableTaskError; a concept whose input is bad fails alone, recorded with its error, and
   the others go on.
4. Rows are committed by the driver in batches (every COMMIT_EVERY rows or COMMIT_SECONDS), always after
   the task wrote its file: an index row never points at nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.index import FAILED, SUCCEEDED, ConceptIndex, Status, now
from pipeline.manifest import Manifest
from pipeline.plan import PlannedConcept, build_plan
from pipeline.store import Store, concept_file
from pipeline.tasks import BaseInfo, TrainTask, base_row

COMMIT_EVERY = 16
COMMIT_SECONDS = 10.0
SKIPPED, PLANNED = Status.SKIPPED, Status.PLANNED


@dataclass(frozen=True)
class TrainOptions:
    root: str | None = None  # overrides the manifest's root (flag or PERFUSION_BATCH_ROOT)
    force: bool = False  # retrain concepts that already succeeded
    only: tuple[str, ...] = ()  # train just these concept names
    dry_run: bool = False
    max_concurrency: int | None = None  # tasks in flight; default: what the cluster can run at once
    gpus_per_task: float = 1.0  # on clusters with GPUs; fractions pack several trainings on one GPU
    device: str = "auto"  # auto | gpu | cpu: see jobs.task_resources
    max_retries: int = 2  # for crashed workers and retryable errors


@dataclass
class ConceptState:
    name: str
    concept_key: str
    status: Status
    step: int = 0
    steps: int = 0
    loss: float | None = None
    started: float | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class RunSummary:
    catalog: str
    root: str
    concepts: dict[str, ConceptState] = field(default_factory=dict)
    seconds: float = 0.0
    dry_run: bool = False

    def count(self, status: str) -> int:
        return sum(1 for s in self.concepts.values() if s.status == status)

    @property
    def ok(self) -> bool:
        return self.count(FAILED) == 0

    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in (SUCCEEDED, FAILED, SKIPPED, PLANNED)}


class Display:
    """What the run reports to; pipeline/progress.py has the terminal implementations."""

    def start(self, summary: RunSummary) -> None: ...
    def update(self, state: ConceptState) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, summary: RunSummary) -> None: ...


class TrainRun:
    def __init__(self, manifest: Manifest, options: TrainOptions = TrainOptions()) -> None:
        self.manifest = manifest
        self.options = options
        self.store = Store(manifest.storage_root(options.root))
        self.index = ConceptIndex(self.store)
        self.base_model = manifest.base_model_path()
        unknown = sorted(set(options.only) - {c.name for c in manifest.concepts})
        if unknown:
            from pipeline.manifest import ManifestError, Problem

            raise ManifestError(
                manifest.source, [Problem("--only", f"no concept named {n!r} in the manifest") for n in unknown]
            )

    def plan(self, base: BaseInfo) -> tuple[list[PlannedConcept], set[str]]:
        """The selected concepts and the keys already trained."""
        from perfusion import METHOD_VERSION

        plan = build_plan(self.manifest, base.fingerprint, METHOD_VERSION, set(base.vocabulary))
        if self.options.only:
            plan = [p for p in plan if p.name in self.options.only]
        done = set() if self.options.force else self.index.succeeded_keys()
        return plan, done

    def execute(self, display: Display | None = None) -> RunSummary:
        import ray

        from pipeline import jobs

        display = display or Display()
        started = time.perf_counter()
        summary = RunSummary(self.manifest.catalog, self.store.root, dry_run=self.options.dry_run)
        jobs.ensure_ray()
        display.message(f"preparing base model {self.base_model!r} (fingerprint, C^-1) ...")
        resources = self._resources()
        preparing = jobs.remote(prepare_base_task, **resources).remote(
            self.base_model, self.store.root, not self.options.dry_run
        )
        # Meanwhile, start the other workers and load the model into each (a Ray worker keeps it for the
        # training tasks it runs next): worker start-up then overlaps prepare_base instead of delaying them.
        warming = [] if self.options.dry_run else self._warm_workers(resources)
        base: BaseInfo = ray.get(preparing)
        plan, done = self.plan(base)
        for item in plan:
            status = SKIPPED if item.concept_key in done else (PLANNED if item.ready else FAILED)
            error = "; ".join(str(p) for p in item.problems) or None
            summary.concepts[item.name] = ConceptState(item.name, item.concept_key, status, error=error)
        display.start(summary)
        pending_rows = [self._failed_row(item, base) for item in plan if not item.ready]
        if self.options.dry_run:
            summary.seconds = time.perf_counter() - started
            display.finish(summary)
            return summary
        todo = [item for item in plan if item.ready and item.concept_key not in done]
        self._dispatch(todo, base, resources, summary, display, pending_rows)
        ray.wait(warming, num_returns=len(warming))  # (done long ago; a warm-up's failure is prepare_base's too)
        summary.seconds = time.perf_counter() - started
        display.finish(summary)
        return summary

    # -- internals -------------------------------------------------------------------------------------

    def _resources(self) -> dict[str, Any]:
        from pipeline import jobs

        return jobs.task_resources(self.options.device, self.options.gpus_per_task)

    def _concurrency(self, resources: dict[str, Any]) -> int:
        from pipeline import jobs

        return self.options.max_concurrency or max(1, jobs.slots(resources))

    def _warm_workers(self, resources: dict[str, Any]) -> list[Any]:
        """One model-loading task for each slot beyond prepare_base's, up to the catalog's size."""
        from pipeline import jobs

        count = min(self._concurrency(resources), len(self.manifest.concepts)) - 1
        return [jobs.remote(warm_worker_task, **resources).remote(self.base_model) for _ in range(max(0, count))]

    def _task(self, item: PlannedConcept, base: BaseInfo) -> TrainTask:
        attempt = uuid.uuid4().hex
        # --force writes a new file beside the old one: artifacts are never overwritten.
        file = concept_file(item.concept_key, attempt) if self.options.force else item.file
        return TrainTask(
            name=item.name,
            token=item.spec.concept_token,
            superclass=item.spec.superclass.strip(),
            images=tuple((f.uri, f.sha256) for f in item.images),
            masks=tuple((f.uri, f.sha256) for f in item.masks) if item.masks else None,
            training=item.training,
            concept_key=item.concept_key,
            file=file,
            base_model=self.base_model,
            fingerprint=base.fingerprint,
            root=self.store.root,
            covariance=base.covariance,
            covariance_sha256=base.covariance_sha256,
            attempt_id=attempt,
        )

    def _dispatch(
        self,
        todo: list[PlannedConcept],
        base: BaseInfo,
        resources: dict[str, Any],
        summary: RunSummary,
        display: Display,
        rows: list[dict[str, Any]],
    ) -> None:
        import ray

        from pipeline import jobs

        board = jobs.ProgressBoard.remote()
        remote_train = jobs.remote(
            train_task, max_retries=self.options.max_retries, retry_exceptions=[jobs.RetryableTaskError], **resources
        )
        limit = self._concurrency(resources)
        queue = list(todo)
        running: dict[Any, tuple[PlannedConcept, TrainTask]] = {}
        last_commit = time.perf_counter()
        while queue or running:
            while queue and len(running) < limit:
                item = queue.pop(0)
                task = self._task(item, base)
                running[remote_train.remote(task, board)] = (item, task)
                state = summary.concepts[item.name]
                state.status, state.started = Status.RUNNING, time.time()
                display.update(state)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for name, (step, steps, loss) in ray.get(board.snapshot.remote()).items():
                state = summary.concepts[name]
                if state.status == Status.RUNNING and step != state.step:
                    state.step, state.steps, state.loss = step, steps, loss
                    display.update(state)
            for ref in ready:
                item, task = running.pop(ref)
                row = self._collect(ref, task)
                rows.append(self._complete_row(row, item))
                state = summary.concepts[item.name]
                state.status, state.error = Status(row["status"]), row.get("error")
                state.seconds = row.get("seconds")
                if row.get("steps"):
                    state.step = state.steps = int(row["steps"])
                display.update(state)
            if rows and (len(rows) >= COMMIT_EVERY or time.perf_counter() - last_commit > COMMIT_SECONDS):
                self.index.append(rows)
                rows.clear()
                last_commit = time.perf_counter()
        self.index.append(rows)
        rows.clear()
        ray.kill(board)

    def _collect(self, ref: Any, task: TrainTask) -> dict[str, Any]:
        """The task's row; a task that failed every retry becomes a failed row with the last error."""
        import ray

        try:
            row: dict[str, Any] = ray.get(ref)
            return row
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            message = str(cause) if cause is not None else str(error).strip().splitlines()[-1]
            row = base_row(task) | {"device": None}
            return row | {"status": FAILED, "error": f"gave up after {self.options.max_retries + 1} tries: {message}"}

    def _complete_row(self, row: dict[str, Any], item: PlannedConcept) -> dict[str, Any]:
        """Add what the driver knows (catalog, tags, base, manifest) to a task's row."""
        from perfusion import METHOD_VERSION

        method = item.training.get("method", "perfusion")
        return row | {
            "catalog": self.manifest.catalog,
            "tags": dict(item.spec.tags),
            "base_model": self.manifest.base_model,
            "method": method,
            "method_version": METHOD_VERSION,
            "manifest_uri": self.manifest.source,
            "created_at": now(),
        }

    def _failed_row(self, item: PlannedConcept, base: BaseInfo) -> dict[str, Any]:
        row = {
            "concept_key": item.concept_key,
            "attempt_id": uuid.uuid4().hex,
            "name": item.name,
            "token": item.spec.concept_token,
            "superclass": item.spec.superclass,
            "fingerprint": base.fingerprint,
            "status": FAILED,
            "error": "; ".join(str(p) for p in item.problems),
            "device": "driver (planning)",
        }
        return self._complete_row(row, item)


def prepare_base_task(spec: str, root: str, write: bool = True) -> BaseInfo:
    from pipeline.tasks import prepare_base

    return prepare_base(spec, root, write)


def warm_worker_task(spec: str) -> bool:
    """Load the base model into this worker process's cache (tasks.worker_base). A failure here is reported
    by prepare_base, which loads the same model, so it is only returned, never raised."""
    from pipeline.tasks import worker_base

    try:
        worker_base(spec)
    except Exception:
        return False
    return True


def train_task(task: TrainTask, board: Any = None) -> dict[str, Any]:
    """The Ray task body: train, reporting progress to the board every few steps, and count metrics."""
    from pipeline import metrics
    from pipeline.tasks import train_one

    report: Callable[[int, int, float], None] | None = None
    if board is not None:
        every = max(1, int(task.training.get("steps", 400)) // 50)

        def report(step: int, steps: int, loss: float) -> None:
            if step == 1 or step % every == 0 or step == steps:
                board.update.remote(task.name, step, steps, loss)

    row = train_one(task, report)
    metrics.record_task(row)
    return row
