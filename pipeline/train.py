"""The training run: manifest -> plan -> one Ray task per concept -> concept files + index rows.

    run = TrainRun(manifest, TrainOptions(...))
    summary = run.execute(display)          # display: pipeline.progress.Display (live table or log lines)

1. A `prepare_base` task loads the base model where the GPUs are, computes its fingerprint and finds (or
   computes once and stores) its C^-1 under covariance/{fingerprint}.
2. The plan (pipeline/plan.py): images read and hashed, a concept_key per concept. Keys with a successful
   row in the index are skipped (idempotent; a run killed midway resumes), unless --force.
3. One task per remaining concept, at most `max_concurrency` in flight, each asking for `gpus_per_task`
   GPUs when the cluster has GPUs (or with --device gpu) and one CPU otherwise. Ray retries crashed
   workers and TransientError (pipeline/worker.py); a concept whose input is bad fails alone, recorded
   with its error, and the others go on.
4. Rows are committed by the driver in batches (every COMMIT_EVERY rows or commit_seconds()), always after
   the task wrote its file: an index row never points at nothing.

Zero-shot products (method zero-shot) are not trained: they are onboarded on the zero-shot base (the
manifest's zero_shot.base_model, prepared by a `prepare_zero_shot_task` only when the run has some), a
fraction of a second each, ONBOARD_CHUNK of them per Ray task so the MM-DiT loads once per chunk (a worker
keeps one base: one that turns from trainings to onboarding loads the MM-DiT in place of the UNet; trainings
are queued first, so that happens about once a worker). Their files and rows are like any concept's: same store layout,
same index, same skip-if-done keys. A catalog of zero-shot products only never loads base_model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.index import ConceptIndex, ConceptRow, Status, commit_seconds
from pipeline.jobs import flag
from pipeline.leases import Leases
from pipeline.manifest import Manifest
from pipeline.photo_facts import PhotoFacts
from pipeline.plan import PlannedConcept, build_plan, check_against_base
from pipeline.store import Store, concept_file
from pipeline.tasks import TrainTask, concept_row
from pipeline.worker import BaseInfo, TransientError

COMMIT_EVERY = 16
ONBOARD_CHUNK = 64  # zero-shot products per onboarding task
LEFTOVER_SECONDS = 3600.0  # a partial or unrecorded file this old belongs to no live run
CHECK_THREADS = 16  # stored files a rerun checks at once (on an object store each check is a GET's latency)


@dataclass(frozen=True)
class TrainOptions:
    """One training run's options; the CLI builds them, and a submitted Ray Job gets them back as flags
    (jobs.options_argv over the `flag` of each field)."""

    root: str | None = flag(None, "--root")  # overrides the manifest's root (or PERFUSION_BATCH_ROOT)
    force: bool = flag(False, "--force")  # retrain concepts that already succeeded
    only: tuple[str, ...] = flag((), "--only")  # train just these concept names
    dry_run: bool = flag(False, "--dry-run")
    max_concurrency: int | None = flag(None, "--concurrency")  # in flight; default: what the cluster runs at once
    gpus_per_task: float = flag(1.0, "--gpus-per-task")  # on GPU clusters; fractions pack several on a GPU
    device: str | None = flag(None, "--device")  # auto | gpu | cpu (jobs.task_resources); None: auto
    pushgateway: str | None = flag(None, "--pushgateway")  # the CLI pushes the run's summary there
    max_retries: int = 2  # for crashed workers and transient errors


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
    adopted: bool = False  # succeeded from the file an earlier, interrupted run stored: not trained now


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
        return self.count(Status.FAILED) == 0

    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in (Status.SUCCEEDED, Status.FAILED, Status.SKIPPED, Status.PLANNED)}


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
        self.zero_shot_model = manifest.base_model_path(zero_shot=True)
        self.bases: tuple[BaseInfo | None, BaseInfo | None] = (None, None)  # (base_model, zero-shot base)
        self.damaged: set[str] = set()  # concept keys whose stored file failed its check: retrained
        self._done_read: tuple[float, set[str]] | None = None  # (when, succeeded keys): _done_now
        unknown = sorted(set(options.only) - {c.name for c in manifest.concepts})
        if unknown:
            from pipeline.manifest import ManifestError, Problem

            raise ManifestError(
                manifest.source, [Problem("--only", f"no concept named {n!r} in the manifest") for n in unknown]
            )

    def plan(
        self, base: BaseInfo | None, zero_shot: BaseInfo | None = None, *, remember: bool = True
    ) -> list[tuple[PlannedConcept, Status]]:
        """The selected concepts, each with what this run does with it: PLANNED (would train), SKIPPED
        (already trained under its key) or FAILED (its files have problems). `validate` and `--dry-run` stop
        here; both write nothing (remember=False: `validate`). `base` is None when no selected concept trains
        (zero-shot products only), `zero_shot` when none is zero-shot. A run remembers what it learned about
        the photos (pipeline/photo_facts.py), so the next plan reads only the photos that changed."""
        fingerprint, words = (base.fingerprint, set(base.vocabulary)) if base is not None else ("", None)
        zero_shot_fingerprint = zero_shot.fingerprint if zero_shot is not None else ""
        known = PhotoFacts.load(self.store)  # photos earlier runs read: unchanged ones are not read again
        plan = build_plan(self.manifest, fingerprint, words, zero_shot_fingerprint, known)
        if remember and not self.options.dry_run:
            known.save(self.store)
        if base is not None:
            plan = check_against_base(self.manifest, plan, base)
        if self.options.only:
            plan = [p for p in plan if p.name in self.options.only]
        done = {} if self.options.force else self.index.succeeded_files()
        damages = self._damages({p.concept_key: done[p.concept_key] for p in plan if p.concept_key in done})
        planned = []
        for item in plan:
            if item.concept_key in damages:
                damage = damages[item.concept_key]
                if damage is None:
                    planned.append((item, Status.SKIPPED))
                    continue
                item = dataclasses.replace(item, notes=(*item.notes, f"retrained: its stored file {damage}"))
                self.damaged.add(item.concept_key)
            planned.append((item, Status.PLANNED if item.ready else Status.FAILED))
        return planned

    def _damages(self, files: dict[str, tuple[str | None, str | None]]) -> dict[str, str | None]:
        """concept key -> what is wrong with its stored file (`_damage`), the files checked CHECK_THREADS at a
        time: every byte is still read and hashed, but a rerun over many trained concepts on an object store
        waits for one round trip per CHECK_THREADS files, not per file."""
        from concurrent.futures import ThreadPoolExecutor

        if not files:
            return {}
        with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(files))) as pool:
            return dict(zip(files, pool.map(lambda recorded: self._damage(*recorded), files.values()), strict=True))

    def _damage(self, file_uri: str | None, sha256: str | None) -> str | None:
        """What is wrong with a successful row's concept file (missing, or not the bytes it recorded), or None."""
        from pipeline.store import ChecksumError, StoreError, storage_problem

        try:
            self.store.read(self.store.locate(file_uri or ""), sha256)
        except FileNotFoundError:
            return f"{file_uri} is missing"
        except ChecksumError:
            return "is damaged (checksum mismatch: not the bytes its row recorded)"
        except (StoreError, OSError) as error:
            return f"cannot be read ({storage_problem(error)})"
        return None

    def superclasses(self) -> tuple[str, ...]:
        """The trained concepts' superclass phrases (their tokenizer pieces are checked against the base)."""
        return tuple(sorted({c.superclass for c in self.manifest.concepts if not self.manifest.is_zero_shot(c)}))

    def needs(self) -> tuple[bool, bool]:
        """(whether a selected concept trains on base_model, whether one is onboarded on the zero-shot base)."""
        selected = [c for c in self.manifest.concepts if not self.options.only or c.name in self.options.only]
        zero_shot = [self.manifest.is_zero_shot(c) for c in selected]
        return not all(zero_shot), any(zero_shot)

    def local_plan(self) -> list[tuple[PlannedConcept, Status]]:
        """The plan without Ray, loading each needed base here (`validate`): nothing is written."""
        from pipeline.worker import prepare_base, prepare_zero_shot

        trains, onboards = self.needs()
        self.store.check_readable()
        words = self.superclasses()
        base = prepare_base(self.base_model, self.store.root, False, words) if trains else None
        return self.plan(base, prepare_zero_shot(self.zero_shot_model) if onboards else None, remember=False)

    def execute(self, display: Display | None = None) -> RunSummary:
        import ray

        from pipeline import jobs

        display = display or Display()
        started = time.perf_counter()
        summary = RunSummary(self.manifest.catalog, self.store.root, dry_run=self.options.dry_run)
        if self.options.dry_run:  # before any model loads: a root this run cannot read or write fails in seconds
            self.store.check_readable()
        else:
            self.store.check_writable()
        jobs.ensure_ray()
        trains, onboards = self.needs()
        resources = self._resources()
        preparing = zero_shot_preparing = None
        warming: list[Any] = []
        if trains:
            display.message(f"preparing base model {self.base_model!r} (fingerprint, C^-1) ...")
            preparing = jobs.remote(prepare_base_task, **resources).remote(
                self.base_model, self.store.root, not self.options.dry_run, self.superclasses()
            )
            # Meanwhile, start the other workers and load the model into each (a Ray worker keeps it for the
            # training tasks it runs next): worker start-up then overlaps prepare_base instead of delaying them.
            warming = [] if self.options.dry_run else self._warm_workers(resources)
        if onboards:
            display.message(f"preparing zero-shot base {self.zero_shot_model!r} (fingerprint, adapter) ...")
            zero_shot_preparing = jobs.remote(prepare_zero_shot_task, **resources).remote(self.zero_shot_model)
        base: BaseInfo | None = ray.get(preparing) if preparing is not None else None
        zero_shot: BaseInfo | None = ray.get(zero_shot_preparing) if zero_shot_preparing is not None else None
        self.bases = (base, zero_shot)
        plan = self.plan(base, zero_shot)
        for item, status in plan:
            error = "; ".join(str(p) for p in item.problems) or None
            summary.concepts[item.name] = ConceptState(item.name, item.concept_key, status, error=error)
            for note in item.notes:
                display.message(f"{item.name}: {note}")
        display.start(summary)
        if self.options.dry_run:
            summary.seconds = time.perf_counter() - started
            display.finish(summary)
            return summary
        self._sweep_leftovers(display)
        for item, _ in plan:
            if item.concept_key in self.damaged:  # the retraining writes it anew; adopting it would keep the damage
                with contextlib.suppress(FileNotFoundError):
                    self.store.remove(item.file)
        pending_rows = [
            concept_row(
                self._task(item),
                Status.FAILED,
                error=summary.concepts[item.name].error,
                device="driver (planning)",
            )
            for item, status in plan
            if status == Status.FAILED
        ]
        todo = [item for item, status in plan if status == Status.PLANNED]
        self._dispatch(todo, resources, summary, display, pending_rows)
        ray.wait(warming, num_returns=len(warming))  # (done long ago; a warm-up's failure is prepare_base's too)
        summary.seconds = time.perf_counter() - started
        display.finish(summary)
        return summary

    # -- internals -------------------------------------------------------------------------------------

    def _sweep_leftovers(self, display: Display) -> None:
        """Remove what killed runs left under concepts/: hidden `.partial` files, and forced retrainings'
        `<key>.<attempt>.safetensors` that no index row points at, each untouched for LEFTOVER_SECONDS (a
        younger one may belong to a run still going). Committed files are never touched."""
        recorded = {
            self.store.locate(uri) for uri in self.index.rows(["file_uri"]).column("file_uri").to_pylist() if uri
        }
        stale = self.store.leftovers("concepts", LEFTOVER_SECONDS)
        for name in self.store.list("concepts"):
            parts = name.removeprefix("concepts/").split(".")
            attempt_file = len(parts) == 3 and parts[2] == "safetensors"  # <key>.<attempt>.safetensors
            if attempt_file and name not in recorded and self.store.age_seconds(name) > LEFTOVER_SECONDS:
                stale.append(name)
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                self.store.remove(name)
        if stale:
            display.message(f"removed {len(stale)} file(s) that interrupted runs left under concepts/")

    def _resources(self) -> dict[str, Any]:
        from pipeline import jobs

        return jobs.task_resources(self.options.device or "auto", self.options.gpus_per_task)

    def _concurrency(self, resources: dict[str, Any]) -> int:
        from pipeline import jobs

        return self.options.max_concurrency or max(1, jobs.slots(resources))

    def _warm_workers(self, resources: dict[str, Any]) -> list[Any]:
        """One model-loading task for each slot beyond prepare_base's, up to the catalog's size."""
        from pipeline import jobs

        count = min(self._concurrency(resources), len(self.manifest.concepts)) - 1
        return [jobs.remote(warm_worker_task, **resources).remote(self.base_model) for _ in range(max(0, count))]

    def _task(self, item: PlannedConcept, base: BaseInfo | None = None) -> TrainTask:
        """The task of one concept, on its base (`base`: given, else the one this run prepared for its kind)."""
        zero_shot = self.manifest.is_zero_shot(item.spec)
        if base is None:
            base = self.bases[1] if zero_shot else self.bases[0]
        assert base is not None, "execute() prepares the base of every planned concept"
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
            selection=item.selection,
            concept_key=item.concept_key,
            file=file,
            base_model=self.zero_shot_model if zero_shot else self.base_model,
            fingerprint=base.fingerprint,
            root=self.store.root,
            covariance=base.covariance,
            covariance_sha256=base.covariance_sha256,
            catalog=self.manifest.catalog,
            base_name=self.manifest.zero_shot.base_model if zero_shot else self.manifest.base_model,
            tags=dict(item.spec.tags),
            manifest_uri=self.manifest.source,
            attempt_id=attempt,
        )

    def _dispatch(
        self,
        todo: list[PlannedConcept],
        resources: dict[str, Any],
        summary: RunSummary,
        display: Display,
        rows: list[ConceptRow],
    ) -> None:
        """Run every task, at most the concurrency limit in flight: one training task per trained concept,
        one onboarding task per ONBOARD_CHUNK zero-shot products."""
        import ray

        from pipeline import jobs

        board = jobs.ProgressBoard.remote()
        retries = {"max_retries": self.options.max_retries, "retry_exceptions": [TransientError]}
        remote_train = jobs.remote(train_task, **retries, **resources)
        remote_onboard = jobs.remote(onboard_task, **retries, **resources)
        limit = self._concurrency(resources)
        trained = [item for item in todo if not self.manifest.is_zero_shot(item.spec)]
        onboarded = [item for item in todo if self.manifest.is_zero_shot(item.spec)]
        queue = [[item] for item in trained]
        queue += [onboarded[i : i + ONBOARD_CHUNK] for i in range(0, len(onboarded), ONBOARD_CHUNK)]
        running: dict[Any, list[TrainTask]] = {}
        leases = Leases(self.store)
        last_commit = time.perf_counter()
        try:
            while queue or running:
                while queue and len(running) < limit:
                    items = self._claimed(queue.pop(0), leases, summary, display)
                    if not items:
                        continue
                    tasks = [self._task(item) for item in items]
                    zero_shot = self.manifest.is_zero_shot(items[0].spec)
                    ref = remote_onboard.remote(tasks) if zero_shot else remote_train.remote(tasks[0], board)
                    running[ref] = tasks
                    for item in items:
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
                    tasks = running.pop(ref)
                    for task, row in zip(tasks, self._collect(ref, tasks), strict=True):
                        rows.append(row)
                        state = summary.concepts[task.name]
                        state.status, state.error, state.seconds = row.status, row.error, row.seconds
                        state.adopted = bool(row.adopted)
                        if row.steps:
                            state.step = state.steps = row.steps
                        display.update(state)
                leases.renew()
                if rows and (len(rows) >= COMMIT_EVERY or time.perf_counter() - last_commit > commit_seconds()):
                    self._commit(rows, leases)
                    last_commit = time.perf_counter()
        finally:  # also on Ctrl-C or SIGTERM: the concepts that finished keep their rows
            self._commit(rows, leases)
            leases.release()
            with contextlib.suppress(Exception):
                ray.kill(board)

    def _commit(self, rows: list[ConceptRow], leases: Leases) -> None:
        """Append the finished rows to the index, then give up their leases (rows first: a lease released
        before its row is committed would let another run train the concept again)."""
        self.index.append(rows)
        leases.release({row.concept_key for row in rows})
        rows.clear()

    def _done_now(self) -> set[str]:
        """The index's succeeded concept keys, re-read at most every commit_seconds(): what other runs on
        this store finished since this run planned."""
        if self._done_read is None or time.perf_counter() - self._done_read[0] > commit_seconds():
            self._done_read = (time.perf_counter(), self.index.succeeded_keys())
        return self._done_read[1]

    def _claimed(
        self, items: list[PlannedConcept], leases: Leases, summary: RunSummary, display: Display
    ) -> list[PlannedConcept]:
        """The items this run may train: those it could lease. One another run is training now is skipped
        (that run records it); one whose lease expired (its run died) is taken over."""
        mine = []
        for item in items:
            holder = leases.claim(item.concept_key)
            retrain = self.options.force or item.concept_key in self.damaged  # its success rows do not count
            if holder is None and not retrain and item.concept_key in self._done_now():  # another run finished it
                leases.release({item.concept_key})
                state = summary.concepts[item.name]
                state.status = Status.SKIPPED
                display.update(state)
                continue
            if holder is None:
                mine.append(item)
                continue
            state = summary.concepts[item.name]
            state.status, state.error = Status.SKIPPED, f"another run is training it ({holder})"
            display.message(f"{item.name}: skipped: {state.error}")
            display.update(state)
        return mine

    def _collect(self, ref: Any, tasks: list[TrainTask]) -> list[ConceptRow]:
        """The rows of a task's concepts; a task that failed every retry fails each with the last error."""
        import ray

        try:
            result = ray.get(ref)
            return list(result) if isinstance(result, list) else [result]
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            message = str(cause) if cause is not None else str(error).strip().splitlines()[-1]
            tries = self.options.max_retries + 1
            return [concept_row(task, Status.FAILED, error=f"gave up after {tries} tries: {message}") for task in tasks]


def prepare_base_task(spec: str, root: str, write: bool = True, superclasses: tuple[str, ...] = ()) -> BaseInfo:
    from pipeline.worker import prepare_base

    return prepare_base(spec, root, write, superclasses)


def prepare_zero_shot_task(spec: str) -> BaseInfo:
    from pipeline.worker import prepare_zero_shot

    return prepare_zero_shot(spec)


def onboard_task(tasks: list[TrainTask], tries: int = 3) -> list[ConceptRow]:
    """The Ray task body of a chunk of zero-shot products: each onboarded on its own, so a product's bad photo
    or a transient failure (tried `tries` times here, not by re-running the chunk) fails that product alone;
    metrics counted."""
    from pipeline import metrics
    from pipeline.tasks import train_one

    rows = []
    for task in tasks:
        for attempt in range(1, tries + 1):
            try:
                rows.append(train_one(task))
                break
            except TransientError as error:
                if attempt == tries:
                    rows.append(concept_row(task, Status.FAILED, error=f"gave up after {tries} tries: {error}"))
    for row in rows:
        metrics.record_task(row)
    return rows


def warm_worker_task(spec: str) -> bool:
    """Load the base model into this worker process's cache (worker.worker_base). A failure here is reported
    by prepare_base, which loads the same model, so it is only returned, never raised."""
    from pipeline.worker import worker_base

    try:
        worker_base(spec)
    except Exception:
        return False
    return True


def train_task(task: TrainTask, board: Any = None) -> ConceptRow:
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
