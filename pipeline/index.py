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
import logging
import posixpath
import random
import threading
import time
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from pipeline.store import CONCEPTS_LATEST, CONCEPTS_TABLE, RENDERS_TABLE, Store, redact, with_storage_retries


class Status(enum.StrEnum):
    """A concept's or an image's state: the index stores SUCCEEDED or FAILED; the run's table shows the rest."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # already in the index under the same key: nothing to do
    PLANNED = "planned"  # --dry-run: would run
    RUNNING = "running"


logger = logging.getLogger(__name__)
COMMIT_ATTEMPTS = 6
# The latest-rows file (ConceptIndex.write_latest): one row per group, the filters latest() takes but tags.
LATEST_GROUP = ("name", "catalog", "base_model", "fingerprint", "method", "superclass")
LATEST_ROW_GROUP = 2048  # rows a lookup by name reads at most
LATEST_FILES_KEY = "perfusion.built_from"  # its schema metadata: the table's file names it was built from
COMMIT_SECONDS_ENV = "PERFUSION_BATCH_COMMIT_SECONDS"


def commit_seconds() -> float:
    """How long a run holds finished rows before committing them (besides every N rows): fewer, larger
    Delta commits against how much a killed run loses (a run stopped by a signal commits on its way out)."""
    import os

    return float(os.environ.get(COMMIT_SECONDS_ENV, "10"))


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, kw_only=True)
class ConceptRow:
    """One training attempt, as the `concepts` table stores it (built in pipeline/tasks.py, concept_row)."""

    concept_key: str
    attempt_id: str
    catalog: str
    name: str
    token: str
    superclass: str
    tags: dict[str, Any] = field(default_factory=dict)  # JSON; filter with latest(tags=...) or DuckDB json
    base_model: str
    fingerprint: str
    method: str  # which method made the concept (perfusion.methods)
    method_version: str
    file_uri: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    status: Status
    error: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    seconds: float | None = None
    device: str | None = None
    created_at: dt.datetime = field(default_factory=now)
    manifest_uri: str | None = None
    # The concept's operating point: the step and seed it was saved from, its default inference gate, and
    # the selection scorer's value there (None without `training.select`). Added in version 2 of this table.
    selected_step: int | None = None
    selected_seed: int | None = None
    beta: float | None = None
    tau: float | None = None
    selection_score: float | None = None
    # True when this attempt recorded a file an earlier attempt stored and died before recording (its
    # seconds are then the check's, not a training's); None in rows written before version 3 of this table.
    adopted: bool | None = None


@dataclass(frozen=True, kw_only=True)
class RenderRow:
    """One rendered-image attempt, as the `renders` table stores it (built in pipeline/render.py, render_row)."""

    render_id: str  # hash of everything that decides the pixels: same inputs, same id
    attempt_id: str
    catalog: str
    job: str
    template: str
    prompt: str  # the template filled with concept tokens
    concept_names: list[str]  # JSON, in placeholder order
    concept_keys: list[str]  # JSON, same order
    seed: int
    settings: dict[str, Any]  # JSON: steps, guidance_scale, resolution, scheduler, lock, gates, ...
    base_model: str
    fingerprint: str
    image_uri: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    status: Status
    error: str | None = None
    seconds: float | None = None
    device: str | None = None
    created_at: dt.datetime = field(default_factory=now)
    manifest_uri: str | None = None
    adopted: bool | None = None  # as in ConceptRow: the PNG an earlier attempt stored, recorded by this one


def arrow_schema(row_type: type) -> pa.Schema:
    """The Arrow schema of a row dataclass, column per field in order: dicts and lists are JSON strings."""
    hints = typing.get_type_hints(row_type)
    columns = []
    for column in fields(row_type):
        kinds = [k for k in typing.get_args(hints[column.name]) or (hints[column.name],) if k is not type(None)]
        kind = typing.get_origin(kinds[0]) or kinds[0]
        columns.append((column.name, _ARROW_TYPES.get(kind, pa.string())))
    return pa.schema(columns)


_ARROW_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), dt.datetime: pa.timestamp("us", tz="UTC")}
CONCEPT_SCHEMA = arrow_schema(ConceptRow)
RENDER_SCHEMA = arrow_schema(RenderRow)


def to_arrow_record(row: ConceptRow | RenderRow) -> dict[str, Any]:
    """A row as its table stores it: JSON strings for dicts and lists (lists keep their order)."""
    record = {}
    for column in fields(row):
        value = getattr(row, column.name)
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True)
        record[column.name] = value
    return record


class DeltaIndex:
    """An append-only Delta table of one store: batched atomic appends, Arrow reads, DuckDB SQL."""

    TABLE = ""
    ROW: type = object
    SCHEMA = pa.schema([])
    VIEW = ""  # the table's name in SQL

    def __init__(self, store: Store) -> None:
        self.store = store
        self.uri = store.uri(self.TABLE)
        self.storage_options = delta_storage_options(store)

    # -- writes ----------------------------------------------------------------------------------------

    def append(self, rows: Sequence[Any]) -> None:
        """Commit `rows` as one Delta transaction. Appends never conflict logically; deltalake rebases them
        over concurrent commits itself, and the one race it reports (two writers both creating the table:
        "protocol changed") is retried here, so concurrent runs lose no rows."""
        if not rows:
            return
        wrong = [type(r).__name__ for r in rows if type(r) is not self.ROW]
        if wrong:
            raise TypeError(f"{type(self).__name__}.append takes {self.ROW.__name__} rows, not {wrong[0]}")
        table = pa.Table.from_pylist([to_arrow_record(r) for r in rows], schema=self.SCHEMA)
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                # merge: a table written before a column was added takes the new columns (old rows read null);
                # a storage outage is waited out (store.with_storage_retries), a lost commit race retried here
                with_storage_retries(
                    lambda: write_deltalake(
                        self.uri, table, mode="append", schema_mode="merge", storage_options=self.storage_options
                    ),
                    f"committing {len(rows)} row(s) to {redact(self.uri)}",
                )
                return
            except CommitFailedError:
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * 2**attempt * (1 + random.random()))

    # -- reads -----------------------------------------------------------------------------------------

    def table(self) -> DeltaTable | None:
        def open_table() -> DeltaTable | None:
            try:
                return DeltaTable(self.uri, storage_options=self.storage_options)
            except TableNotFoundError:
                return None

        return with_storage_retries(open_table, f"reading {redact(self.uri)}")

    def rows(self, columns: Sequence[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """All rows (or a projection/filter of them) as an Arrow table; empty with the schema if no index yet."""
        table = self.table()
        if table is None:
            empty = self.SCHEMA.empty_table()
            return empty.select(list(columns)) if columns else empty
        dataset = table.to_pyarrow_dataset()
        # One thread: Arrow's scanner threads otherwise outlive the call and, at interpreter exit, abort the
        # process (SIGABRT, "terminate called without an active exception") once the table has a few files.
        return with_storage_retries(
            lambda: dataset.to_table(columns=list(columns) if columns else None, filter=filter, use_threads=False),
            f"reading {redact(self.uri)}",
        )

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
        """Merge the small files that batched commits leave (run now and then; readers are unaffected).
        The replaced files stay until `vacuum`: a reader of the Delta log (deltalake, polars, DuckDB's
        `delta_scan`, Spark) sees each row once; globbing the folder's Parquet files (DuckDB `read_parquet`)
        would see both copies, so never read the table that way."""
        table = self.table()
        return (
            {}
            if table is None
            else dict(with_storage_retries(table.optimize.compact, f"compacting {redact(self.uri)}"))
        )

    def vacuum(self, retention_hours: int = 168) -> list[str]:
        """Delete the files no version of the table newer than `retention_hours` uses (after compact);
        returns them. Time travel to versions older than that is given up."""
        table = self.table()
        if table is None:
            return []
        return list(table.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False))

    def succeeded_ids(self, column: str) -> set[str]:
        done = self.rows([column], filter=pc.field("status") == Status.SUCCEEDED)
        return set(done.column(column).to_pylist())


class ConceptIndex(DeltaIndex):
    """The concept rows of one store: one per training attempt."""

    TABLE, ROW, SCHEMA, VIEW = CONCEPTS_TABLE, ConceptRow, CONCEPT_SCHEMA, "concepts"

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        # Lookups by name keep the table open and read only the commits since their last call (a downstream
        # app keeps one ConceptIndex): opening it anew costs more than the lookup itself.
        self._lookup_table: DeltaTable | None = None
        self._lookup_lock = threading.Lock()

    def _current_dataset(self) -> ds.Dataset | None:
        """The table's current version as a dataset (a snapshot), None before the first commit."""
        with self._lookup_lock:
            if self._lookup_table is None:
                self._lookup_table = self.table()
            else:
                with_storage_retries(self._lookup_table.update_incremental, f"reading {redact(self.uri)}")
            return None if self._lookup_table is None else self._lookup_table.to_pyarrow_dataset()

    def succeeded_keys(self) -> set[str]:
        """concept_keys with a successful attempt: what a rerun skips."""
        return self.succeeded_ids("concept_key")

    def succeeded_files(self) -> dict[str, tuple[str | None, str | None]]:
        """concept_key -> (file_uri, sha256) of its latest successful attempt: what a rerun skips, once the
        file is checked."""
        done = self.rows(
            ["concept_key", "file_uri", "sha256", "created_at"], filter=pc.field("status") == Status.SUCCEEDED
        )
        latest: dict[str, tuple[Any, str | None, str | None]] = {}
        for row in done.to_pylist():
            seen = latest.get(row["concept_key"])
            if seen is None or row["created_at"] > seen[0]:
                latest[row["concept_key"]] = (row["created_at"], row["file_uri"], row["sha256"])
        return {key: (uri, sha) for key, (_, uri, sha) in latest.items()}

    def compact(self) -> dict[str, Any]:
        """Merge the small files (DeltaIndex.compact), then rebuild the latest-rows file the by-name lookups
        read (write_latest)."""
        merged = super().compact()
        self.write_latest()
        return merged

    def write_latest(self) -> int:
        """Write CONCEPTS_LATEST: the latest successful row of each LATEST_GROUP (a name in one catalog, base,
        method and superclass), sorted by name in small row groups, so a lookup by name reads a footer and
        one row group (milliseconds at a million rows), and the table files it was built from, so a lookup
        also scans the files committed since (the tail) and stays exact between compactions. A derived file:
        deleting it only makes lookups scan the whole table again. Returns its row count."""
        table = self.table()
        if table is None:
            return 0
        dataset = table.to_pyarrow_dataset()
        succeeded = dataset.to_table(filter=pc.field("status") == Status.SUCCEEDED, use_threads=False)
        ordered = succeeded.sort_by([*((c, "ascending") for c in LATEST_GROUP), ("created_at", "descending")])
        first = np.ones(ordered.num_rows, dtype=bool)  # the first row of each group: its latest
        if ordered.num_rows:
            same = np.ones(ordered.num_rows - 1, dtype=bool)
            for column in LATEST_GROUP:
                values = ordered.column(column).to_numpy(zero_copy_only=False)
                same &= values[1:] == values[:-1]
            first[1:] = ~same
        latest = ordered.filter(pa.array(first))
        built_from = sorted(_file_name(fragment.path) for fragment in dataset.get_fragments())
        latest = latest.replace_schema_metadata({LATEST_FILES_KEY: json.dumps(built_from)})
        buffer = pa.BufferOutputStream()
        pq.write_table(latest, buffer, row_group_size=LATEST_ROW_GROUP)
        self.store.put(CONCEPTS_LATEST, buffer.getvalue().to_pybytes())
        return latest.num_rows

    def _latest_candidates(self, names: list[str], condition: pc.Expression) -> pa.Table | None:
        """Rows that can be the answer of a by-name lookup: the latest-rows file's rows of those names and
        the rows of every table file committed after it was built; None when there is no such file (or it
        cannot be read): then the whole table is scanned."""
        dataset = self._current_dataset()
        if dataset is None or not self.store.exists(CONCEPTS_LATEST):
            return None
        try:
            with self.store.fs.open(self.store.path(CONCEPTS_LATEST), "rb") as handle:
                latest = pq.ParquetFile(handle)
                schema = latest.schema_arrow
                built_from = set(json.loads((schema.metadata or {})[LATEST_FILES_KEY.encode()]))
                known = [f for f in schema.names if f in CONCEPT_SCHEMA.names]  # built before a column was added
                saved = latest.read_row_groups(_row_groups_of(latest, names), use_threads=False)
        except (OSError, KeyError, ValueError, pa.ArrowException) as error:
            logger.warning("index: %s unusable (%s); scanning the whole table", CONCEPTS_LATEST, error)
            return None
        tail = [f for f in dataset.get_fragments() if _file_name(f.path) not in built_from]
        recent = ds.FileSystemDataset(tail, dataset.schema, dataset.format, dataset.filesystem)
        pieces = [saved.select(known).filter(condition), recent.to_table(filter=condition, use_threads=False)]
        return pa.concat_tables(pieces, promote_options="default")

    def latest(
        self,
        names: Iterable[str] | None = None,
        *,
        catalog: str | None = None,
        base_model: str | None = None,
        fingerprint: str | None = None,
        superclass: str | None = None,
        method: str | None = None,
        tags: Mapping[str, Any] | None = None,
        status: str | None = Status.SUCCEEDED,
    ) -> list[dict[str, Any]]:
        """The latest row per concept name matching the filters (default: successful attempts only)."""
        condition = None
        for column, value in (
            ("catalog", catalog),
            ("base_model", base_model),
            ("fingerprint", fingerprint),
            ("superclass", superclass),
            ("method", method),
            ("status", status),
        ):
            if value is not None:
                term = pc.field(column) == value
                condition = term if condition is None else condition & term
        if names is not None:
            names = list(names)
            if not names:  # nothing asked for (a render of prompts without placeholders): no rows
                return []
            term = pc.field("name").isin(names)
            condition = term if condition is None else condition & term
        candidates = None
        if names is not None and status == Status.SUCCEEDED and not tags:  # what the latest-rows file holds
            assert condition is not None
            candidates = self._latest_candidates(names, condition)
        rows = (self.rows(filter=condition) if candidates is None else candidates).to_pylist()
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

    TABLE, ROW, SCHEMA, VIEW = RENDERS_TABLE, RenderRow, RENDER_SCHEMA, "renders"

    def succeeded_render_ids(self) -> set[str]:
        """render_ids with a successful attempt: what a rerun skips."""
        return self.succeeded_ids("render_id")

    def of_job(self, job: str, catalog: str | None = None) -> list[dict[str, Any]]:
        """The successful rows of a job (the latest per render_id), in plan order: template, names, seed."""
        condition = (pc.field("job") == job) & (pc.field("status") == Status.SUCCEEDED)
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


def _row_groups_of(latest: pq.ParquetFile, names: list[str]) -> list[int]:
    """The row groups of the latest-rows file (sorted by name) whose name range holds one of `names`, by
    their footer statistics: a lookup of one name reads one row group."""
    column = latest.schema_arrow.get_field_index("name")
    groups = []
    for group in range(latest.metadata.num_row_groups):
        stats = latest.metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max or any(stats.min <= name <= stats.max for name in names):
            groups.append(group)
    return groups


def _file_name(path: str) -> str:
    """A table file's own name (Delta names them part-...-<uuid>.parquet): the same whatever the store's
    root is now, so a moved store's latest-rows file still matches its table's files."""
    return posixpath.basename(path)


def _tags_match(tags_json: str | None, wanted: Mapping[str, Any]) -> bool:
    tags = json.loads(tags_json or "{}")
    return all(str(tags.get(k)) == str(v) for k, v in wanted.items())
