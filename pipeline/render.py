"""The render run: a manifest's render jobs -> Ray Data -> PNGs, render rows, contact sheets.

    run = RenderRun(manifest, RenderOptions(jobs=("new-scenes",)))
    summary = run.execute(progress)

1. A Ray task loads the base model where the renderers will run: its fingerprint, its C^-1 in the store
   (computed once if missing), and the token length of every prompt template (a prompt longer than the text
   encoder's limit is an error before anything renders).
2. Every concept a job needs is resolved in the concept index (latest success for this catalog and base)
   and its file's checksum verified; a concept that is not trained, failed, or damaged is named, with the
   fix, and the images that need it are skipped (blocked; exit 1) while the others render. Only when no
   image at all can render does nothing run (RenderPlanError; exit 2).
3. The plan (pipeline/render_plan.py): one row per image with a render_id; ids with a successful row in the
   render index are dropped (idempotent: a scheduler may rerun this as often as it likes), then --limit.
4. Ray Data: from_items(rows).map_batches(Renderer, ActorPoolStrategy) with one actor per GPU (one per CPU
   without GPUs); the driver streams the results and commits rows in batches, each after its PNG exists.
5. A contact sheet and an HTML page per job, from every successful row of the job (this run's and earlier).

A catalog with zero-shot products (method zero-shot) has two bases: rows of trained products render on
base_model, rows of zero-shot products on zero_shot.base_model (an MM-DiT with its DynaIP adapter), each
kind in its own Ray Data pass with its own actors (one base model a GPU), one after the other; a job may
hold rows of both. Each base is prepared (steps 1-2) only when some row needs it.
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from perfusion.config import resolution_problem
from pipeline.index import ConceptIndex, RenderIndex, RenderRow, Status, commit_seconds
from pipeline.jobs import flag
from pipeline.leases import Leases
from pipeline.manifest import Manifest, ManifestError, Problem, RenderJob
from pipeline.render_plan import (
    ConceptRef,
    PlannedImage,
    RenderPlanError,
    blocked_images,
    capped_prompts,
    combinations_for,
    needed_names,
    plan_job,
    resolve_concepts,
)
from pipeline.store import Store, sheet_files

COMMIT_EVERY = 64
Progress = Callable[[int, int, int], None]  # (rows done, rows to do, rows failed)


@dataclass(frozen=True)
class RenderOptions:
    """One render run's options; a submitted Ray Job gets them back as flags (jobs.options_argv)."""

    root: str | None = flag(None, "--root")  # overrides the manifest's root (or PERFUSION_BATCH_ROOT)
    jobs: tuple[str, ...] = flag((), "--job")  # render just these jobs (default: all)
    dry_run: bool = flag(False, "--dry-run")
    limit: int | None = flag(None, "--limit")  # render at most this many new rows
    batch_size: int = flag(8, "--batch-size")  # rows per actor call: one pass per group of equal settings
    actors: int | None = flag(None, "--actors")  # default: one per GPU, else one per CPU
    gpus_per_actor: float = flag(1.0, "--gpus-per-actor")
    device: str | None = flag(None, "--device")  # auto | gpu | cpu (jobs.task_resources); None: auto
    pushgateway: str | None = flag(None, "--pushgateway")  # the CLI pushes the run's summary there
    schedule: str | None = flag(None, "--schedule")  # the schedule this run belongs to (alert rules)
    max_retries: int = 2  # actor restarts and batch retries after a crash


@dataclass
class RenderSummary:
    catalog: str
    root: str
    planned: int = 0  # rows in the plan
    skipped: int = 0  # already rendered
    rendered: int = 0  # rendered by this run (adopted ones not included)
    adopted: int = 0  # stored by an earlier, interrupted run: recorded by this one
    failed: int = 0
    blocked: int = 0  # not planned: a concept they need cannot render (not trained, failed, damaged)
    errors: list[str] = field(default_factory=list)
    sheets: dict[str, str] = field(default_factory=dict)  # job -> contact sheet URI
    pages: dict[str, str] = field(default_factory=dict)  # job -> HTML page URI
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.blocked == 0

    def counts(self) -> dict[str, int]:
        """Images by status, for the Pushgateway summary."""
        return {
            Status.SUCCEEDED: self.rendered + self.adopted,
            Status.FAILED: self.failed,
            Status.SKIPPED: self.skipped,
        }

    def line(self) -> str:
        verb = "would render" if self.dry_run else "rendered"
        count = self.planned - self.skipped if self.dry_run else self.rendered
        return (
            f"{self.catalog}: {verb} {count}, "
            + (f"adopted {self.adopted} (stored by an interrupted run), " if self.adopted else "")
            + f"skipped {self.skipped} (already rendered), failed {self.failed}"
            + (f", blocked {self.blocked} (a concept cannot render)" if self.blocked else "")
            + f" in {self.seconds:.1f}s; root {self.root}"
        )


class RenderRun:
    def __init__(self, manifest: Manifest, options: RenderOptions = RenderOptions()) -> None:
        self.manifest = manifest
        self.options = options
        if not manifest.renders:
            raise ManifestError(
                manifest.source, [Problem("renders", "the manifest has no render jobs: add a renders: section")]
            )
        known = {job.name for job in manifest.renders}
        unknown = [
            Problem("--job", f"no render job named {n!r} (jobs: {sorted(known)})")
            for n in options.jobs
            if n not in known
        ]
        if unknown:
            raise ManifestError(manifest.source, unknown)
        self.jobs: list[RenderJob] = [j for j in manifest.renders if not options.jobs or j.name in options.jobs]
        self.store = Store(manifest.storage_root(options.root))
        self.concept_index = ConceptIndex(self.store)
        self.index = RenderIndex(self.store)
        self.base_model = manifest.base_model_path()

    # -- planning --------------------------------------------------------------------------------------

    def prompt_texts(self) -> list[str]:
        """Every text a render encodes, as templates in manifest order: each job's prompts, then its negative
        prompt when it has one (braces escaped: it has no placeholders). check_prompts reads their counts."""
        return [text for job in self.manifest.renders for text in [*job.prompts, *self._negative(job)]]

    @staticmethod
    def _negative(job: RenderJob) -> list[str]:
        return [job.negative_prompt.replace("{", "{{").replace("}", "}}")] if job.negative_prompt else []

    def check_prompts(self, counts: list[int], limit: int, zero_shot: bool = False, base: Any = None) -> None:
        """ManifestError for every template or negative prompt longer than the text encoder's limit (it would
        be cut), and with `base` (a worker.BaseInfo) every job resolution off its latent grid; counts are of
        prompt_texts(); zero_shot: of the zero-shot base, for the jobs that render zero-shot products."""
        problems = []
        positions = [
            (f"renders[{i}].prompts[{j}]" if j < len(job.prompts) else f"renders[{i}].negative_prompt", job)
            for i, job in enumerate(self.manifest.renders)
            for j in range(len(job.prompts) + len(self._negative(job)))
        ]
        for (path, job), count in zip(positions, counts, strict=True):
            if job not in self.jobs or (zero_shot and not self._renders_zero_shot(job)):
                continue
            if count > limit:
                encoder = "zero-shot base's text encoder" if zero_shot else "text encoder"
                problems.append(
                    Problem(path, f"{count} tokens, more than the {encoder}'s {limit}: shorten it (it would be cut)")
                )
        problems += [] if base is None else self._resolution_problems(base)
        if problems:
            raise ManifestError(self.manifest.source, sorted(problems, key=str))

    def _resolution_problems(self, base: Any) -> list[Problem]:
        """A job's resolution off the base's latent grid (worker.BaseInfo.resolution_step): every row would fail."""
        return [
            Problem(f"renders[{i}].resolution", wrong)
            for i, job in enumerate(self.manifest.renders)
            if job in self.jobs
            and job.resolution is not None
            and (wrong := resolution_problem(job.resolution, base.resolution_step)) is not None
        ]

    def _renders_zero_shot(self, job: RenderJob) -> bool:
        zero_shot = self.manifest.zero_shot_names()
        return any(n in zero_shot for t in job.prompts for c in combinations_for(self.manifest, job, t) for n in c)

    def needs(self) -> tuple[bool, bool]:
        """(whether any row renders on base_model, whether any renders on the zero-shot base)."""
        zero_shot = self.manifest.zero_shot_names()
        combos = [c for job in self.jobs for t in job.prompts for c in combinations_for(self.manifest, job, t)]
        return any(not c or c[0] not in zero_shot for c in combos), any(c and c[0] in zero_shot for c in combos)

    def resolve(
        self, fingerprint: str, zero_shot_fingerprint: str = ""
    ) -> tuple[dict[str, ConceptRef], dict[str, str]]:
        """(the concepts the jobs need that can render, each file's checksum verified now; the names that
        cannot -> why, with the fix). The images of the others render: one bad photo never stops a catalog."""
        from pipeline.store import StoreError

        names = needed_names(self.manifest, self.jobs)
        refs, blocked = resolve_concepts(self.manifest, names, self.concept_index, fingerprint, zero_shot_fingerprint)
        for name, ref in list(refs.items()):
            try:
                self.store.read(self.store.locate(ref.file_uri), ref.sha256)
            except (StoreError, OSError) as error:
                blocked[name] = f"concept {name!r}: {error}"
                del refs[name]
        return refs, blocked

    def plan(
        self, fingerprint: str, refs: dict[str, ConceptRef], zero_shot_fingerprint: str = ""
    ) -> tuple[list[PlannedImage], set[str]]:
        rows = [
            row for job in self.jobs for row in plan_job(self.manifest, job, refs, fingerprint, zero_shot_fingerprint)
        ]
        return rows, self.index.succeeded_render_ids()

    # -- running ---------------------------------------------------------------------------------------

    def execute(self, progress: Progress | None = None, message: Callable[[str], None] = print) -> RenderSummary:
        import ray

        from pipeline import jobs

        started = time.perf_counter()
        summary = RenderSummary(self.manifest.catalog, self.store.root, dry_run=self.options.dry_run)
        if self.options.dry_run:  # before any work: a root this run cannot read or write fails in seconds
            self.store.check_readable()
        else:
            self.store.check_writable()
        jobs.ensure_ray()
        resources = self._actor_resources()
        needs_base, needs_zero_shot = self.needs()
        bases: dict[bool, Any] = {}  # zero_shot -> BaseInfo of the base that renders those rows
        if needs_base:
            message(f"preparing base model {self.base_model!r} (fingerprint, C^-1, prompt lengths) ...")
            bases[False], counts, limit = ray.get(
                jobs.remote(prepare_render_task, **resources).remote(
                    self.base_model, self.store.root, self.prompt_texts()
                )
            )
            self.check_prompts(counts, limit, base=bases[False])
        if needs_zero_shot:
            spec = self.manifest.base_model_path(zero_shot=True)
            message(f"preparing zero-shot base {spec!r} (fingerprint, prompt lengths) ...")
            templates = self.prompt_texts()
            words = sorted({c.superclass.strip() for c in self.manifest.concepts if self.manifest.is_zero_shot(c)})
            bases[True], counts, limit = ray.get(
                jobs.remote(prepare_zero_shot_render_task, **resources).remote(spec, templates, words)
            )
            self.check_prompts(counts, limit, zero_shot=True)
        fingerprint = bases[False].fingerprint if False in bases else ""
        zero_shot_fingerprint = bases[True].fingerprint if True in bases else ""
        refs, blocked = self.resolve(fingerprint, zero_shot_fingerprint)
        plan, done = self.plan(fingerprint, refs, zero_shot_fingerprint)
        if blocked and not plan:  # nothing at all can render: the input is what is wrong
            raise RenderPlanError([blocked[name] for name in sorted(blocked)])
        summary.blocked = blocked_images(self.manifest, self.jobs, set(blocked))
        for name in sorted(blocked):
            message(f"skipped: {blocked[name]}")
        todo = [row for row in plan if row.render_id not in done]
        summary.planned, summary.skipped = len(plan), len(plan) - len(todo)
        if self.options.limit is not None:
            todo = todo[: self.options.limit]
        message(f"{len(plan)} image(s) planned in {len(self.jobs)} job(s); {summary.skipped} already rendered")
        for line in capped_prompts(self.manifest, self.jobs):
            message(f"  capped: {line}")
        leases = Leases(self.store)
        try:
            if not self.options.dry_run and todo:
                todo = self._claimed(todo, leases, summary, message)
                done_rows = 0
                with leases.kept_alive():
                    for zero_shot in (False, True):
                        rows = [row for row in todo if row.zero_shot == zero_shot]
                        if rows:
                            spec = self.manifest.base_model_path(zero_shot=zero_shot)
                            resource = bases[zero_shot]
                            self._render(rows, spec, resource, resources, summary, progress, done_rows, len(todo))
                            done_rows += len(rows)
        finally:
            leases.release()
        if not self.options.dry_run:
            self._write_sheets(summary)
        summary.seconds = time.perf_counter() - started
        return summary

    def _claimed(
        self, todo: list[PlannedImage], leases: Leases, summary: RenderSummary, message: Callable[[str], None]
    ) -> list[PlannedImage]:
        """The rows of the jobs this run could lease (one lease per job): a job another run on this store is
        rendering now is left to it (counted as skipped), so two renders never render one image twice."""
        mine = []
        for job in sorted({row.job for row in todo}):
            holder = leases.claim(f"render-{self.manifest.catalog}-{job}")
            rows = [row for row in todo if row.job == job]
            if holder is None:
                done = self.index.succeeded_render_ids()  # what a run that held the lease before us rendered
                mine += [row for row in rows if row.render_id not in done]
                summary.skipped += sum(row.render_id in done for row in rows)
            else:
                message(f"{job}: skipped {len(rows)} image(s): another run is rendering this job ({holder})")
                summary.skipped += len(rows)
        return mine

    def _actor_resources(self) -> dict[str, Any]:
        from pipeline import jobs

        return jobs.task_resources(self.options.device or "auto", self.options.gpus_per_actor)

    def _render(
        self,
        todo: list[PlannedImage],
        spec: str,
        base: Any,
        resources: dict[str, Any],
        summary: RenderSummary,
        progress: Progress | None,
        before: int = 0,
        total: int | None = None,
    ) -> None:
        """One Ray Data pass over rows that render on one base (`spec`); progress counts from `before` of
        `total`."""
        import ray
        import ray.data

        from pipeline import jobs
        from pipeline.renderer import Renderer

        quiet_ray_data_console()
        actors = self.options.actors or max(
            1, min(jobs.slots(resources), math.ceil(len(todo) / self.options.batch_size))
        )
        by_id = {row.render_id: row for row in todo}
        blocks = max(1, math.ceil(len(todo) / self.options.batch_size))
        # Bounded retries: Ray Data's default is to restart actors and retry batches forever, which never ends
        # on a batch that kills its actor every time. Ray 2.60 has no named parameter for these two yet, only
        # the **ray_remote_args it warns about; the warning is silenced here on purpose.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            dataset = ray.data.from_items([row.to_record() for row in todo], override_num_blocks=blocks).map_batches(
                Renderer,
                fn_constructor_kwargs={
                    "base_model": spec,
                    "root": self.store.root,
                    "fingerprint": base.fingerprint,
                    "covariance": base.covariance,
                    "covariance_sha256": base.covariance_sha256,
                },
                batch_size=self.options.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors),
                max_restarts=self.options.max_retries,
                max_task_retries=self.options.max_retries,
                **resources,
            )
        pending: list[RenderRow] = []
        seen: set[str] = set()
        last_commit = time.perf_counter()
        total = len(todo) if total is None else total
        if progress and not before:
            progress(0, total, 0)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for result in batch.to_pylist():  # type: ignore[union-attr]  # pyarrow, as batch_format asks
                    seen.add(result["render_id"])
                    pending.append(self._row(by_id[result["render_id"]], result))
                    if result["status"] == Status.SUCCEEDED and result.get("adopted"):
                        summary.adopted += 1
                    elif result["status"] == Status.SUCCEEDED:
                        summary.rendered += 1
                    else:
                        summary.failed += 1
                        summary.errors.append(f"{result['render_id']}: {result['error']}")
                if progress:
                    progress(before + len(seen), total, summary.failed)
                if len(pending) >= COMMIT_EVERY or time.perf_counter() - last_commit > commit_seconds():
                    self.index.append(pending)
                    pending.clear()
                    last_commit = time.perf_counter()
        except (ray.exceptions.RayError, RuntimeError) as error:
            # The dataset gave up (an actor kept crashing): every row without a result is recorded as failed.
            text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            for row in todo:
                if row.render_id not in seen:
                    failed = {"status": Status.FAILED, "error": f"gave up: {text}"}
                    pending.append(self._row(row, failed))
                    summary.failed += 1
            summary.errors.append(f"the render dataset failed: {text}")
        finally:
            self.index.append(pending)

    def _row(self, planned: PlannedImage, result: dict[str, Any]) -> RenderRow:
        """The index row of one image attempt: the plan's fields and the actor's (renderer.outcome)."""
        return RenderRow(
            render_id=planned.render_id,
            attempt_id=uuid.uuid4().hex,
            catalog=self.manifest.catalog,
            job=planned.job,
            template=planned.template,
            prompt=planned.prompt,
            concept_names=[ref.name for ref in planned.concepts],
            concept_keys=[ref.concept_key for ref in planned.concepts],
            seed=planned.seed,
            settings=planned.settings,
            base_model=self.manifest.zero_shot.base_model if planned.zero_shot else self.manifest.base_model,
            fingerprint=planned.fingerprint,
            image_uri=result.get("image_uri"),
            sha256=result.get("sha256"),
            bytes=result.get("bytes"),
            width=result.get("width"),
            height=result.get("height"),
            status=Status(result["status"]),
            error=result.get("error"),
            seconds=result.get("seconds"),
            device=result.get("device"),
            manifest_uri=self.manifest.source,
            adopted=bool(result.get("adopted")),
        )

    def _write_sheets(self, summary: RenderSummary) -> None:
        from pipeline.sheets import contact_sheet, html_page, sheet_rows

        for job in self.jobs:
            sheet_file, page_file = sheet_files(job.name)
            if not (summary.rendered or summary.adopted or summary.failed) and self.store.exists(sheet_file):
                summary.sheets[job.name], summary.pages[job.name] = (
                    self.store.uri(sheet_file),
                    self.store.uri(page_file),
                )
                continue  # nothing new to show: the sheet on disk is current
            rows = self.index.of_job(job.name, catalog=self.manifest.catalog)
            if not rows:
                continue
            shown = sheet_rows(rows)
            images = {r["render_id"]: self.store.read(self.store.locate(r["image_uri"]), r["sha256"]) for r in shown}
            picture = contact_sheet(shown, images, title=job.name, total=len(rows))
            sheet = self.store.put(sheet_file, picture)
            page = self.store.put(page_file, html_page(job.name, rows, self.store).encode())
            summary.sheets[job.name], summary.pages[job.name] = sheet, page


def quiet_ray_data_console() -> None:
    """Ray Data logs each execution step at INFO and draws its own progress bars; the CLI shows its own
    progress (pipeline/progress.py). Its console goes to warnings only; its log file in Ray's session folder
    (logs/ray-data) still has everything."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
            # ... and not the notice that its bars are off (we turned them off: ours are on).
            handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars disabled"))


def prepare_zero_shot_render_task(
    spec: str, templates: list[str], superclasses: list[str]
) -> tuple[Any, list[int], int]:
    """On a worker: the zero-shot base's identity (pipeline.worker.prepare_zero_shot) and an upper bound of each
    template's length in tokens as the zero-shot renderer fills it (every placeholder "an <superclass>", the
    superclass of the most tokens), with its text stream's length."""
    from pipeline.manifest import placeholders
    from pipeline.worker import prepare_zero_shot, worker_base

    info = prepare_zero_shot(spec)
    tokenizer = worker_base(spec).pipeline.tokenizer
    counts = []
    for template in templates:
        filled = [template.format(**{n: f"an {word}" for n in placeholders(template)}) for word in superclasses]
        counts.append(max(len(ids) for ids in tokenizer(filled).input_ids))
    return info, counts, int(worker_base(spec).pipeline.text_tokens)


def prepare_render_task(spec: str, root: str, templates: list[str]) -> tuple[Any, list[int], int]:
    """On a worker: the base's identity and C^-1 (pipeline.worker.prepare_base), and each template's length
    in tokens with the text encoder's limit."""
    from pipeline.renderer import prompt_token_counts
    from pipeline.worker import prepare_base

    return (prepare_base(spec, root), *prompt_token_counts(spec, templates))
