"""The index: Delta Lake tables under {root}/index/. `concepts`: one row per training attempt;
`renders`: one row per rendered image (pipeline/render.py).

Downstream apps read it with this module, the CLI (`perfusion-batch concepts ...`), or any Delta reader
(DuckDB, Spark, Polars, pyarrow). Rows are appended, never updated: the history of every attempt is kept,
and "the concept called X" means the latest successful row for X (optionally for one base model).

Why Delta: appends from concurrent runs are atomic commits with optimistic concurrency (two drivers on one
catalog lose no rows), on a plain object store without a database server; time travel and compaction come
with it. The driver commits a batch of rows at a time (pipeline/train.py), never the Ray tasks.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from pipeline.store import CONCEPTS_TABLE, RENDERS_TABLE, Store


class Status(enum.StrEnum):
    """A concept's or an image's state: the index stores SUCCEEDED or FAILED; the run's table shows the rest."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # already in the index under the same key: nothing to do
    PLANNED = "planned"  # --dry-run: would run
    RUNNING = "running"


SUCCEEDED, FAILED = Status.SUCCEEDED, Status.FAILED
COMMIT_ATTEMPTS = 6

CONCEPT_SCHEMA = pa.schema(
    [
        ("concept_key", pa.string()),
        ("attempt_id", pa.string()),
        ("catalog", pa.string()),
        ("name", pa.string()),
        ("token", pa.string()),
        ("superclass", pa.string()),
        ("tags", pa.string()),  # JSON object; filter with concepts_where(tags={...}) or DuckDB json functions
        ("base_model", pa.string()),
        ("fingerprint", pa.string()),
        ("method", pa.string()),
        ("method_version", pa.string()),
        ("file_uri", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("status", pa.string()),  # succeeded | failed
        ("error", pa.string()),
        ("steps", pa.int64()),
        ("final_loss", pa.float64()),
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("manifest_uri", pa.string()),
    ]
)


RENDER_SCHEMA = pa.schema(
    [
        ("render_id", pa.string()),  # hash of everything that decides the pixels: same inputs, same id
        ("attempt_id", pa.string()),
        ("catalog", pa.string()),
        ("job", pa.string()),
        ("template", pa.string()),
        ("prompt", pa.string()),  # the template filled with concept tokens
        ("concept_names", pa.string()),  # JSON list, in placeholder order
        ("concept_keys", pa.string()),  # JSON list, same order
        ("seed", pa.int64()),
        ("settings", pa.string()),  # JSON: steps, guidance_scale, resolution, scheduler, lock, gates, ...
        ("base_model", pa.string()),
        ("fingerprint", pa.string()),
        ("image_uri", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("status", pa.string()),  # succeeded | failed
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("manifest_uri", pa.string()),
    ]
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DeltaIndex:
    """An append-only Delta table of one store: batched atomic appends, Arrow reads, DuckDB SQL."""

    TABLE = ""
    SCHEMA = pa.schema([])
    VIEW = ""  # the table's name in SQL

    def __init__(self, store: Store) -> None:
        self.store = store
        self.uri = store.uri(self.TABLE)
        self.storage_options = delta_storage_options(store)

    # -- writes ----------------------------------------------------------------------------------------

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Commit `rows` as one Delta transaction. Appends never conflict logically; deltalake rebases them
        over concurrent commits itself, and the one race it reports (two writers both creating the table:
        "protocol changed") is retried here, so concurrent runs lose no rows."""
        if not rows:
            return
        table = pa.Table.from_pylist([_normalise(r, self.SCHEMA) for r in rows], schema=self.SCHEMA)
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                write_deltalake(self.uri, table, mode="append", storage_options=self.storage_options)
                return
            except CommitFailedError:
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * 2**attempt * (1 + random.random()))

    # -- reads -----------------------------------------------------------------------------------------

    def table(self) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return None

    def rows(self, columns: Sequence[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """All rows (or a projection/filter of them) as an Arrow table; empty with the schema if no index yet."""
        table = self.table()
        if table is None:
            empty = self.SCHEMA.empty_table()
            return empty.select(list(columns)) if columns else empty
        dataset = table.to_pyarrow_dataset()
        return dataset.to_table(columns=list(columns) if columns else None, filter=filter)

    def sql(self, query: str) -> pa.Table:
        """Run SQL with DuckDB over the table, exposed as the view named VIEW (`concepts`, `renders`)."""
        import duckdb

        table = self.table()
        source = table.to_pyarrow_dataset() if table is not None else self.SCHEMA.empty_table()
        connection = duckdb.connect()
        try:
            connection.register(self.VIEW, source)
            return connection.sql(query).to_arrow_table()
        finally:
            connection.close()

    def compact(self) -> dict[str, Any]:
        """Merge the small files that batched commits leave (run now and then; readers are unaffected)."""
        table = self.table()
        return {} if table is None else dict(table.optimize.compact())

    def succeeded_ids(self, column: str) -> set[str]:
        done = self.rows([column], filter=pc.field("status") == SUCCEEDED)
        return set(done.column(column).to_pylist())


class ConceptIndex(DeltaIndex):
    """The concept rows of one store: one per training attempt."""

    TABLE, SCHEMA, VIEW = CONCEPTS_TABLE, CONCEPT_SCHEMA, "concepts"

    def succeeded_keys(self) -> set[str]:
        """concept_keys with a successful attempt: what a rerun skips."""
        return self.succeeded_ids("concept_key")

    def latest(
        self,
        names: Iterable[str] | None = None,
        *,
        catalog: str | None = None,
        base_model: str | None = None,
        fingerprint: str | None = None,
        superclass: str | None = None,
        tags: Mapping[str, Any] | None = None,
        status: str | None = SUCCEEDED,
    ) -> list[dict[str, Any]]:
        """The latest row per concept name matching the filters (default: successful attempts only)."""
        condition = None
        for column, value in (
            ("catalog", catalog),
            ("base_model", base_model),
            ("fingerprint", fingerprint),
            ("superclass", superclass),
            ("status", status),
        ):
            if value is not None:
                term = pc.field(column) == value
                condition = term if condition is None else condition & term
        if names is not None:
            term = pc.field("name").isin(list(names))
            condition = term if condition is None else condition & term
        rows = self.rows(filter=condition).to_pylist()
        latest: dict[str, dict[str, Any]] = {}
        for row in rows:
            if tags and not _tags_match(row["tags"], tags):
                continue
            seen = latest.get(row["name"])
            if seen is None or row["created_at"] > seen["created_at"]:
                latest[row["name"]] = row
        return [latest[name] for name in sorted(latest)]

    def get(self, name: str, **filters: Any) -> dict[str, Any] | None:
        found = self.latest([name], **filters)
        return found[0] if found else None


class RenderIndex(DeltaIndex):
    """The render rows of one store: one per rendered image attempt."""

    TABLE, SCHEMA, VIEW = RENDERS_TABLE, RENDER_SCHEMA, "renders"

    def succeeded_render_ids(self) -> set[str]:
        """render_ids with a successful attempt: what a rerun skips."""
        return self.succeeded_ids("render_id")

    def of_job(self, job: str, catalog: str | None = None) -> list[dict[str, Any]]:
        """The successful rows of a job (the latest per render_id), in plan order: template, names, seed."""
        condition = (pc.field("job") == job) & (pc.field("status") == SUCCEEDED)
        if catalog is not None:
            condition = condition & (pc.field("catalog") == catalog)
        latest: dict[str, dict[str, Any]] = {}
        for row in self.rows(filter=condition).to_pylist():
            seen = latest.get(row["render_id"])
            if seen is None or row["created_at"] > seen["created_at"]:
                latest[row["render_id"]] = row
        return sorted(latest.values(), key=lambda r: (r["template"], r["concept_names"], r["seed"]))


def delta_storage_options(store: Store) -> dict[str, str]:
    """deltalake (delta-rs) does not use fsspec: pass it the same endpoint and credentials, from the
    environment, as its own option names. Nothing here is logged or written to the index."""
    if store.protocol not in {"s3", "s3a"}:
        return {}
    import os

    options: dict[str, str] = {}
    for env, key in (
        ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
        ("AWS_REGION", "AWS_REGION"),
        ("AWS_DEFAULT_REGION", "AWS_REGION"),
    ):
        if os.environ.get(env) and key not in options:
            options[key] = os.environ[env]
    if options.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        options["AWS_ALLOW_HTTP"] = "true"
    # S3 has conditional writes (If-None-Match) since 2024: delta-rs uses them for safe concurrent commits
    # without a DynamoDB lock table.
    options.setdefault("conditional_put", "etag")
    return options


def _normalise(row: Mapping[str, Any], schema: pa.Schema) -> dict[str, Any]:
    out = {name: row.get(name) for name in schema.names}
    for column in ("tags", "concept_names", "concept_keys", "settings"):  # JSON columns
        if column in out and out[column] is not None and not isinstance(out[column], str):
            out[column] = json.dumps(out[column], sort_keys=True)  # (lists keep their order)
    if "tags" in out and out["tags"] is None:
        out["tags"] = "{}"
    if out["created_at"] is None:
        out["created_at"] = now()
    return out


def _tags_match(tags_json: str | None, wanted: Mapping[str, Any]) -> bool:
    tags = json.loads(tags_json or "{}")
    return all(str(tags.get(k)) == str(v) for k, v in wanted.items())
