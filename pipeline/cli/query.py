"""`concepts` and `renders`: the index, listed, shown, and queried with SQL (DuckDB)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli.app import IndexRoot, ManifestOption, app, fail, load, user_errors

if TYPE_CHECKING:
    from pipeline.index import ConceptIndex, DeltaIndex, RenderIndex

concepts_app = typer.Typer(
    help="Query the concept index: list, show, SQL. Example: perfusion-batch concepts list -m manifests/catalog.yaml",
    no_args_is_help=True,
)
app.add_typer(concepts_app, name="concepts")
FormatOption = Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")]


def _index(root: str | None, manifest: str | None) -> ConceptIndex:
    from pipeline.index import ConceptIndex
    from pipeline.store import Store

    if root is None and manifest is None:
        raise fail("give --root URI (or set PERFUSION_BATCH_ROOT) or --manifest FILE")
    if root is None:
        root = load(manifest).storage_root()  # type: ignore[arg-type]
    with user_errors():
        return ConceptIndex(Store(root))


def _emit(rows: list[dict[str, object]], columns: list[str], fmt: str) -> None:
    import csv
    import datetime
    import json
    import sys

    if fmt not in {"table", "json", "csv"}:
        raise fail(f"--format must be table, json or csv, not {fmt!r}")
    rows = [{k: (v.isoformat() if isinstance(v, datetime.datetime) else v) for k, v in r.items()} for r in rows]
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
        _print_table(columns, cells)


def _print_table(columns: list[str], cells: list[list[str]]) -> None:
    """On a terminal a rich table whose cells never wrap (a value too wide for the terminal ends in '...');
    elsewhere (a log, a pipe) plain aligned columns of any width, one line a row, never wrapped mid-word."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        widths = [max([len(column), *(len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
        for line in [columns, *cells]:
            typer.echo("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip())
        return
    table = Table()
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    for row in cells:
        table.add_row(*row)
    console.print(table)


def _cell(column: str, value: object) -> str:
    """Short forms for the table view (json and csv keep full values)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if column == "created_at":
        return str(value)[:19].replace("T", " ")
    if column in {"file_uri", "image_uri"}:
        return str(value).rsplit("/", 1)[-1][:16] + "..."
    return str(value)


LIST_COLUMNS = [
    "name",
    "token",
    "superclass",
    "method",
    "status",
    "steps",
    "final_loss",
    "beta",
    "tau",
    "bytes",
    "created_at",
    "file_uri",
]


@concepts_app.command("list")
def concepts_list(
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    catalog: Annotated[str | None, typer.Option("--catalog", help="Only this catalog.")] = None,
    superclass: Annotated[str | None, typer.Option("--superclass", help="Only this superclass.")] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="Only this method (perfusion, residuals, textual_inversion).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE tag filter (repeatable).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Latest attempt per name, failed ones included.")] = False,
    fmt: FormatOption = "table",
) -> None:
    """The latest successful concept per name (with --failed: the latest attempt, whatever its status).

    Example: perfusion-batch concepts list --root s3://bucket/catalog --tag category=mugs --format csv
    """
    tags = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--tag {item!r}: use KEY=VALUE, e.g. --tag category=mugs")
        tags[key] = value
    from pipeline.index import Status

    index = _index(root, manifest)
    from perfusion.methods import METHODS

    if method is not None and method not in METHODS:
        raise fail(f"--method {method!r}: use one of {', '.join(sorted(METHODS))}")
    rows = index.latest(
        catalog=catalog,
        superclass=superclass,
        method=method,
        tags=tags or None,
        status=None if failed else Status.SUCCEEDED,
    )
    _emit(rows, [*LIST_COLUMNS, "error"] if failed else LIST_COLUMNS, fmt)


@concepts_app.command("show")
def concepts_show(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the file's sha256.")] = True,
    fmt: FormatOption = "json",
) -> None:
    """Every field of the latest successful concept called NAME; verifies its file's checksum.

    Example: perfusion-batch concepts show dotted-star -m manifests/catalog.yaml
    """
    index = _index(root, manifest)
    row = index.get(name)
    if row is None:
        raise fail(f"no successful concept named {name!r} in {index.uri} (see `perfusion-batch concepts list`)", 1)
    if verify:
        from pipeline.store import ChecksumError

        try:
            index.store.read(index.store.locate(row["file_uri"]), row["sha256"])
        except ChecksumError as error:
            raise fail(str(error), 1) from None
        except FileNotFoundError:
            raise fail(f"{row['file_uri']} is missing from the store", 1) from None
    _emit([row], list(row), fmt)


SqlArgument = Annotated[str, typer.Argument(help="SQL over the index's table (`concepts` or `renders`).")]


def add_query_command(
    sub_app: typer.Typer, view: str, example: str, index_of: Callable[[str | None, str | None], DeltaIndex]
) -> None:
    """`perfusion-batch VIEW query SQL`: SQL (DuckDB) over one Delta index, exposed as the table VIEW; any
    query error is a message, exit code 2."""

    def query(
        sql: SqlArgument,
        root: IndexRoot = None,
        manifest: ManifestOption = None,
        fmt: FormatOption = "table",
    ) -> None:
        index = index_of(root, manifest)
        try:
            table = index.sql(sql)
        except Exception as error:
            raise fail(f"query failed: {error}") from None
        _emit(table.to_pylist(), table.column_names, fmt)

    def compact(root: IndexRoot = None, manifest: ManifestOption = None) -> None:
        index = index_of(root, manifest)
        with user_errors():
            metrics = index.compact()
        typer.echo(f"{view}: {metrics.get('numFilesRemoved', 0)} file(s) merged into {metrics.get('numFilesAdded', 0)}")

    def vacuum(
        root: IndexRoot = None,
        manifest: ManifestOption = None,
        retention_hours: Annotated[
            int, typer.Option("--retention-hours", min=0, help="Keep files newer than this.")
        ] = 168,
    ) -> None:
        index = index_of(root, manifest)
        with user_errors():
            removed = index.vacuum(retention_hours)
        typer.echo(f"{view}: {len(removed)} unused file(s) deleted")

    sub_app.command(
        "compact",
        help=f"Merge the {view[:-1]} index's small files (run now and then; readers are unaffected). Read the "
        "table through its Delta log (deltalake, polars, DuckDB delta_scan), never by globbing its Parquet files."
        f"\n\nExample: perfusion-batch {view} compact -m catalog.yaml",
    )(compact)
    sub_app.command(
        "vacuum",
        help=f"Delete the {view[:-1]} index's files that no recent version uses (after compact).\n\n"
        f"Example: perfusion-batch {view} vacuum -m catalog.yaml --retention-hours 168",
    )(vacuum)
    sub_app.command(
        "query",
        help=f"Run SQL (DuckDB) over the {view[:-1]} index, exposed as the table `{view}`.\n\n"
        f'Example: perfusion-batch {view} query "{example}" -m catalog.yaml',
    )(query)


add_query_command(concepts_app, "concepts", "SELECT status, count(*) FROM concepts GROUP BY status", _index)


renders_app = typer.Typer(
    help="Query the render index: list, SQL. Example: perfusion-batch renders list -m manifests/catalog.yaml",
    no_args_is_help=True,
)
app.add_typer(renders_app, name="renders")
RENDER_COLUMNS = ["job", "prompt", "concept_names", "seed", "status", "seconds", "created_at", "image_uri"]


def _render_index(root: str | None, manifest: str | None) -> RenderIndex:
    from pipeline.index import RenderIndex

    return RenderIndex(_index(root, manifest).store)


@renders_app.command("list")
def renders_list(
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    job: Annotated[str | None, typer.Option("--job", help="Only this job.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Failed attempts instead of rendered images.")] = False,
    fmt: FormatOption = "table",
) -> None:
    """Rendered images (one row each), or with --failed the images whose attempts all failed so far (the
    latest error of each; one a later run rendered is not listed).

    Example: perfusion-batch renders list -m manifests/catalog.yaml --job new-scenes --format csv
    """
    import pyarrow.compute as pc

    from pipeline.index import Status

    index = _render_index(root, manifest)
    condition = pc.field("status").isin([Status.FAILED, Status.SUCCEEDED])
    if job:
        condition = condition & (pc.field("job") == job)
    latest: dict[tuple[str, str], dict[str, object]] = {}  # (render_id, status) -> its latest attempt
    for row in index.rows(filter=condition).to_pylist():
        seen = latest.get((row["render_id"], row["status"]))
        if seen is None or row["created_at"] > seen["created_at"]:
            latest[(row["render_id"], row["status"])] = row
    rendered = {render_id for render_id, status in latest if status == Status.SUCCEEDED}
    if failed:
        wanted = [r for (rid, status), r in latest.items() if status == Status.FAILED and rid not in rendered]
    else:
        wanted = [r for (_, status), r in latest.items() if status == Status.SUCCEEDED]
    rows = sorted(wanted, key=lambda r: (r["job"], r["prompt"], r["seed"]))
    _emit(rows, [*RENDER_COLUMNS, "error"] if failed else RENDER_COLUMNS, fmt)


add_query_command(renders_app, "renders", "SELECT job, count(*) FROM renders GROUP BY job", _render_index)
