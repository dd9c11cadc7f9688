"""Concepts from a product table (the manifest's `concepts_from:`): a product feed or PIM export as Parquet,
CSV or a Delta table, one product a row, mapped to concept fields by a column map.

    concepts_from:
      table: products.parquet         # manifest-relative path or any fsspec URI (s3://, gs://, file://)
      format: parquet                 # parquet | csv | delta; default from the name (a _delta_log folder: delta)
      columns:                        # the table's column for each field; default: the field's own name
        name: slug
        superclass: category_word
        images: photos                # a list of URIs/globs, or one URI or glob (CSV: one a cell)
        masks: mask_photos            # optional, like images
        token: token                  # optional
        method: method                # optional: training.method per product
        tags: [sku, brand]            # columns copied into the product's tags (null cells left out)
        training: {steps: steps}      # per-product training overrides (null cells keep the catalog's)

Relative image URIs in the table start at the table's folder. `read_concepts` returns one concept document
(the inline `concepts:` entry it stands for) per row, and where each row's fields came from, so every problem
names the table, its row (1-based, as a spreadsheet shows it, header excluded) and the column.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.types as pat

REQUIRED = ("name", "superclass", "images")
LIST_FIELDS = ("images", "masks")


@dataclass(frozen=True)
class TableProblem:
    """One problem of the table: where (column or row and column) and what."""

    where: str  # "products.parquet row 12, column 'photos' (images)" or "concepts_from.columns.name"
    message: str


class ProductTableError(Exception):
    """The table cannot be read or its columns do not fit the map; nothing was planned."""

    def __init__(self, problems: list[TableProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.where}: {p.message}" for p in problems))


@dataclass(frozen=True)
class ProductRows:
    """The table's products as concept documents, and where each came from (for problem paths)."""

    table: str  # as the manifest names it
    documents: list[dict[str, Any]]
    columns: dict[str, str]  # concept field (name, superclass, ..., tags.<k>, training.<k>) -> table column

    def where(self, row: int, field: str = "") -> str:
        """ "products.parquet row 12, column 'photos' (images[2])" for field "images[2]" of documents[11]; a
        field no column gave (a catalog default's select block, say) is named alone: "... row 12 (training.x)"."""
        at = f"{self.table} row {row + 1}"
        if not field:
            return at
        column = self.columns.get(field.split("[")[0])
        if column is None:
            return f"{at} ({field})"
        return f"{at}, column {column!r}" + ("" if column == field else f" ({field})")


def table_location(table: str, manifest_dir: str) -> str:
    """The table's URI from any working directory: a relative path starts at the manifest's folder."""
    if "://" in table or os.path.isabs(table):
        return table
    return os.path.abspath(os.path.join(manifest_dir, table))


def read_concepts(table: str, manifest_dir: str, format: str | None, column_map: dict[str, Any]) -> ProductRows:
    """Read the table and map each row to a concept document; raises ProductTableError when the table cannot
    be read or a mapped column is missing or of the wrong type (row-level problems are the manifest's)."""
    location = table_location(table, manifest_dir)
    data = _read(location, format or _format_of(location), table)
    columns = _column_map(column_map)
    _check_columns(data, columns, table)
    folder = _folder(location)
    documents = [_document(record, columns, folder) for record in _records(data, columns)]
    return ProductRows(table, documents, columns)


def _format_of(location: str) -> str:
    lowered = location.lower().rstrip("/")
    if lowered.endswith((".parquet", ".pq")):
        return "parquet"
    if lowered.endswith((".csv", ".csv.gz")):
        return "csv"
    return "delta"  # a folder: a Delta table (its _delta_log says so when it is read)


def _read(location: str, format: str, table: str) -> pa.Table:
    where = "concepts_from.table"
    try:
        if format == "delta":
            from deltalake import DeltaTable

            from pipeline.index import delta_storage_options
            from pipeline.store import Store

            options = delta_storage_options(Store(location))  # S3 endpoint and region, as the index reads them
            return DeltaTable(location, storage_options=options or None).to_pyarrow_table()
        import fsspec

        with fsspec.open(location, "rb", compression="infer" if format == "csv" else None) as handle:
            if format == "parquet":
                import pyarrow.parquet as pq

                return pq.read_table(handle)
            import pyarrow.csv as pcsv

            return pcsv.read_csv(handle)
    except FileNotFoundError:
        raise ProductTableError([TableProblem(where, f"{table}: file not found (check the path)")]) from None
    except Exception as error:  # a table that does not parse as its format, or storage that refuses it
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = f"is it a {format} table? set concepts_from.format if not"
        raise ProductTableError([TableProblem(where, f"cannot read {table} ({text}): {hint}")]) from None


def _column_map(column_map: dict[str, Any]) -> dict[str, str]:
    """Concept field -> table column: the map's entries, the required fields by their own names otherwise."""
    columns = {field: column_map.get(field) or field for field in REQUIRED}
    columns |= {
        field: column
        for field, column in column_map.items()
        if field not in (*REQUIRED, "tags", "training") and column  # manifest.ColumnMap's one-column fields
    }
    columns |= {f"tags.{column}": column for column in column_map.get("tags") or []}
    columns |= {f"training.{name}": column for name, column in (column_map.get("training") or {}).items()}
    return columns


def _check_columns(data: pa.Table, columns: dict[str, str], table: str) -> None:
    problems = []
    present = set(data.column_names)
    for field, column in columns.items():
        path = f"concepts_from.columns.{field}"
        if column not in present:
            shown = ", ".join(sorted(present)[:20]) + (", ..." if len(present) > 20 else "")
            problems.append(TableProblem(path, f"no column {column!r} in {table} (its columns: {shown})"))
            continue
        kind = data.schema.field(column).type
        if field in LIST_FIELDS:
            ok = (
                pat.is_string(kind)
                or pat.is_large_string(kind)
                or ((pat.is_list(kind) or pat.is_large_list(kind)) and pat.is_string(kind.value_type))
            )
            expected = "a list of strings, or a string"
        elif field.startswith(("tags.", "training.")):
            ok = pat.is_string(kind) or pat.is_integer(kind) or pat.is_floating(kind) or pat.is_boolean(kind)
            ok = ok or pat.is_null(kind)
            expected = "strings, numbers or booleans"
        else:
            ok = pat.is_string(kind) or pat.is_large_string(kind) or pat.is_null(kind)
            expected = "strings"
        if not ok:
            problems.append(TableProblem(f"{table} column {column!r} ({field})", f"holds {kind}; expected {expected}"))
    if problems:
        raise ProductTableError(problems)


def _records(data: pa.Table, columns: dict[str, str]) -> Iterator[dict[str, Any]]:
    """One dict per row (field -> value), a batch at a time: only the mapped columns are converted."""
    wanted = sorted(set(columns.values()))
    for batch in data.select(wanted).to_batches(max_chunksize=10_000):
        by_column = batch.to_pydict()
        for index in range(batch.num_rows):
            yield {field: by_column[column][index] for field, column in columns.items()}


def _folder(location: str) -> str:
    return posixpath.dirname(location) if "://" in location else os.path.dirname(location)


def _document(record: dict[str, Any], columns: dict[str, str], folder: str) -> dict[str, Any]:
    """A row -> the inline concept entry it stands for; null cells are left out (pydantic then names what is
    missing), image URIs made absolute from the table's folder."""
    document: dict[str, Any] = {}
    for field in ("name", "superclass", "token"):
        if record.get(field) is not None:
            document[field] = record[field]
    for field in LIST_FIELDS:
        value = record.get(field)
        if value is not None:
            uris = [value] if isinstance(value, str) else list(value)
            document[field] = [_from(folder, uri) if isinstance(uri, str) else uri for uri in uris]
    training = {
        k.removeprefix("training."): v for k, v in record.items() if k.startswith("training.") and v is not None
    }
    if record.get("method") is not None:
        training["method"] = record["method"]
    if training:
        document["training"] = training
    tags = {k.removeprefix("tags."): v for k, v in record.items() if k.startswith("tags.") and v is not None}
    if tags:
        document["tags"] = tags
    return document


def _from(folder: str, uri: str) -> str:
    if not uri.strip() or "://" in uri or os.path.isabs(uri):
        return uri
    return posixpath.join(folder, uri) if "://" in folder else os.path.join(folder, uri)
