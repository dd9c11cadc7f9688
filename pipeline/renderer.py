"""What runs in a Ray Data actor: render rows of the render plan into PNGs in the store.

    ds.map_batches(Renderer, fn_constructor_kwargs=..., batch_format="pyarrow", compute=ActorPoolStrategy(...))

The base pipeline is loaded once per actor (pipeline.worker) and concept files once per actor (verified
against their sha256 from the index; any method's file, perfusion.methods.load_concept_file). An actor on
the zero-shot base (an MM-DiT) renders with perfusion.ZeroShotRenderer, any other with
perfusion.ConceptRenderer: both take the same requests and settings. Rows in one
batch that share sampler settings render in ONE forward pass even when their concept combinations differ:
each row carries its own concept set (perfusion.ConceptRenderer, per-sample edits), weights are never
merged per combination.

Failure policy, row by row (the retry decision is pipeline.worker.is_transient's): a batch that fails is
rendered again row by row; a row, or a concept file, that fails transiently is tried once more, then
returned as a "failed" row with its error; bad input (a concept file that fails its checksum, a request the
concepts cannot serve) fails its rows at once. A crashed actor is restarted by Ray and its batch retried
(max_restarts / max_task_retries in pipeline/render.py).
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.index import RENDER_SCHEMA, Status
from pipeline.store import Artifact, Store, render_file, sha256_hex
from pipeline.worker import describe, is_transient, planned_base, stored_covariance, worker_base, worker_label

# What an actor returns per row (outcome()): the render table's columns only rendering can fill (index.py).
OUTPUT_COLUMNS = (
    "render_id",
    "image_uri",
    "sha256",
    "bytes",
    "width",
    "height",
    "status",
    "error",
    "seconds",
    "device",
    "adopted",
)
OUTPUT_SCHEMA = pa.schema([RENDER_SCHEMA.field(name) for name in OUTPUT_COLUMNS])
SCHEDULERS = {  # manifest name -> diffusers class name; "default" keeps the base model's own
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


class Renderer:
    """A Ray Data callable class: one base pipeline per actor, concepts cached, rows in, result rows out."""

    def __init__(self, base_model: str, root: str, fingerprint: str, covariance: str, covariance_sha256: str):
        import perfusion

        self.base = planned_base(base_model, fingerprint)
        self.store = Store(root)
        # The zero-shot base (an MM-DiT) renders zero-shot products, with no C^-1; any other base, trained ones.
        self.renderer: Any = (
            perfusion.ZeroShotRenderer(self.base)
            if self.base.architecture == "mmdit"
            else perfusion.ConceptRenderer(
                self.base, stored_covariance(self.store, self.base, covariance, covariance_sha256)
            )
        )
        self.default_scheduler = self.base.pipeline.scheduler
        self.attached: dict[str, str] = {}  # concept_key -> token
        self.device = worker_label()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.render_records(batch.to_pylist()), schema=OUTPUT_SCHEMA)

    def render_records(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Render plan records (RenderRow.to_record()) -> result rows (OUTPUT_SCHEMA), in input order."""
        results: dict[str, dict[str, Any]] = {}
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            try:  # storage waits out an outage (store.with_storage_retries); one that outlasts it fails the row
                existing = self._adopt(record["render_id"])
                if existing is not None:  # an earlier attempt stored the PNG and died before its row was committed
                    results[record["render_id"]] = existing
                    continue
                _try_twice(functools.partial(self._attach, json.loads(record["concepts"])))
            except Exception as error:  # a damaged or missing concept file, or storage that kept failing
                results[record["render_id"]] = self._failed(record, error)
                continue
            groups[record["settings"]].append(record)
        for rows in groups.values():
            for row in self._render_group(rows):
                results[row["render_id"]] = row
        return [results[record["render_id"]] for record in records]

    # -- rendering -------------------------------------------------------------------------------------

    def _render_group(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One forward pass for rows with the same settings; on failure, row by row (transient failures
        tried twice), so one bad row never fails the others."""
        try:
            return self._render(records)
        except Exception as error:
            if len(records) == 1 and not is_transient(error):
                return [self._failed(records[0], error)]
        out: list[dict[str, Any]] = []
        for record in records:
            try:
                out += _try_twice(functools.partial(self._render, [record]))
            except Exception as error:
                out.append(self._failed(record, error))
        return out

    def _render(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import perfusion

        started = time.perf_counter()
        settings = json.loads(records[0]["settings"])
        self._use_scheduler(settings["scheduler"])
        requests = []
        for record in records:
            tokens = tuple(ref["token"] for ref in json.loads(record["concepts"]))
            gates = {}
            for token, (beta, tau) in settings["gates"].items():
                concept = self.renderer.concepts[token]
                if not isinstance(concept, perfusion.Concept):
                    raise perfusion.RenderError(
                        f"the job's gates name {token}, a {concept.method} concept: it has no gate (beta, tau); "
                        "remove its entry from the job's gates"
                    )
                gates[token] = (concept.beta if beta is None else beta, concept.tau if tau is None else tau)
            requests.append(
                perfusion.RenderRequest(
                    record["prompt"],
                    seed=int(record["seed"]),
                    concepts=tokens,
                    negative_prompt=settings["negative_prompt"],
                    gates=gates,
                )
            )
        images = self.renderer.render(
            requests,
            perfusion.RenderSettings(
                steps=settings["steps"],
                guidance_scale=settings["guidance_scale"],
                height=settings["resolution"],
                width=settings["resolution"],
                lock=settings["lock"],
                localized=settings.get("localized", True),
                batch_size=len(requests),
            ),
        )
        seconds = (time.perf_counter() - started) / len(records)
        return [self._store(record, image, seconds) for record, image in zip(records, images, strict=True)]

    def _store(self, record: dict[str, Any], image: Any, seconds: float) -> dict[str, Any]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        try:
            artifact = self.store.write_once(render_file(record["render_id"]), buffer.getvalue())
        except FileExistsError:  # a racing attempt stored it first: same inputs, same image
            adopted = self._adopt(record["render_id"])
            if adopted is None:
                raise
            return adopted
        return outcome(record["render_id"], Status.SUCCEEDED, self.device, artifact, image.size, seconds=seconds)

    def _adopt(self, render_id: str) -> dict[str, Any] | None:
        """A stored PNG for this render_id -> its result row; None if there is none (or it is unreadable,
        which create-only writes make impossible short of tampering: then it is removed and rendered again)."""
        from PIL import Image

        relative = render_file(render_id)
        if not self.store.exists(relative):
            return None
        data = self.store.read(relative)
        try:
            with Image.open(io.BytesIO(data)) as picture:
                picture.load()
                width, height = picture.size
        except OSError:
            self.store.remove(relative)
            return None
        artifact = Artifact(self.store.uri(relative), sha256_hex(data), len(data), relative)
        return outcome(render_id, Status.SUCCEEDED, self.device, artifact, (width, height), seconds=0.0, adopted=True)

    def _attach(self, refs: list[dict[str, str]]) -> None:
        """Load each concept once per actor, checking its sha256 against the index row it came from."""
        import perfusion

        for ref in refs:
            if ref["concept_key"] in self.attached:
                continue
            data = self.store.read(self.store.locate(ref["file_uri"]), ref["sha256"])
            concept = perfusion.load_concept_file(
                data, self.base, name=self.store.uri(self.store.locate(ref["file_uri"]))
            )
            self.renderer.attach(concept)
            self.attached[ref["concept_key"]] = concept.token

    def _use_scheduler(self, name: str) -> None:
        pipeline = self.base.pipeline
        if name == "default" or self.base.architecture == "mmdit":  # its own sampler (manifest-checked)
            pipeline.scheduler = self.default_scheduler
            return
        import diffusers

        cls = getattr(diffusers, SCHEDULERS[name])
        if type(pipeline.scheduler) is not cls:
            pipeline.scheduler = cls.from_config(self.default_scheduler.config)

    def _failed(self, record: dict[str, Any], error: BaseException) -> dict[str, Any]:
        return outcome(record["render_id"], Status.FAILED, self.device, error=describe(error))


def outcome(
    render_id: str,
    status: Status,
    device: str,
    artifact: Artifact | None = None,
    size: tuple[int, int] | None = None,
    *,
    seconds: float | None = None,
    error: str | None = None,
    adopted: bool = False,
) -> dict[str, Any]:
    """One row's result as the actor returns it (OUTPUT_COLUMNS): the one place it is made."""
    return {
        "render_id": render_id,
        "image_uri": artifact.path if artifact else None,  # relative to the root: the store stays movable
        "sha256": artifact.sha256 if artifact else None,
        "bytes": artifact.bytes if artifact else None,
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "status": status,
        "error": error,
        "seconds": seconds,
        "device": device,
        "adopted": adopted,
    }


def _try_twice(attempt: Callable[[], Any]) -> Any:
    """attempt(), once more if it failed transiently (pipeline.worker.is_transient); else its error."""
    try:
        return attempt()
    except Exception as error:
        if not is_transient(error):
            raise
    return attempt()


def prompt_token_counts(base_model: str, templates: list[str]) -> tuple[list[int], int]:
    """Tokens per template once filled (a concept token is one token) and the text encoder's limit."""
    import perfusion
    from pipeline.manifest import placeholders

    tokenizer = worker_base(base_model).tokenizer
    counts = []
    for template in templates:
        counts.append(
            perfusion.prompt_tokens(tokenizer, template.format(**{name: "x" for name in placeholders(template)}))
        )
    return counts, int(tokenizer.model_max_length)
