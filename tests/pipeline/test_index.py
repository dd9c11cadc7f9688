"""The concept index (Delta Lake): appends, latest-per-name, filters, SQL, and concurrent writers."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from pipeline.index import ConceptIndex, ConceptRow, Status
from pipeline.store import Store


def row(name: str, status: str = "succeeded", minute: int = 0, **extra):
    return ConceptRow(
        concept_key=f"key-{name}-{minute}",
        attempt_id=f"attempt-{name}-{minute}",
        catalog="shop",
        name=name,
        token=f"<{name}>",
        superclass=extra.pop("superclass", "mug"),
        tags=extra.pop("tags", {"category": "kitchen"}),
        base_model="tiny",
        fingerprint="f" * 64,
        method="perfusion",
        method_version="perfusion-1",
        status=Status(status),
        error=None if status == "succeeded" else "boom",
        created_at=dt.datetime(2026, 1, 1, 12, minute, tzinfo=dt.UTC),
        **extra,
    )


def test_append_takes_typed_rows_only(tmp_path):
    index = ConceptIndex(Store(str(tmp_path)))
    with pytest.raises(TypeError, match="takes ConceptRow rows, not dict"):
        index.append([{"name": "mug"}])
    assert index.latest() == []


def test_latest_successful_row_per_name(tmp_path):
    index = ConceptIndex(Store(str(tmp_path)))
    assert index.latest() == []  # no table yet: empty, not an error
    index.append([row("mug", minute=1), row("bag", minute=2)])
    index.append([row("mug", minute=5), row("mug", "failed", minute=9)])
    latest = index.latest()
    assert [(r["name"], r["created_at"].minute) for r in latest] == [("bag", 2), ("mug", 5)]
    with_failures = index.latest(status=None)
    assert [(r["name"], r["status"]) for r in with_failures] == [("bag", "succeeded"), ("mug", "failed")]
    assert index.succeeded_keys() == {"key-mug-1", "key-bag-2", "key-mug-5"}
    assert index.get("mug")["concept_key"] == "key-mug-5"
    assert index.get("nothing") is None


def test_filters_by_tags_superclass_and_catalog(tmp_path):
    index = ConceptIndex(Store(str(tmp_path)))
    index.append(
        [
            row("mug", tags={"category": "kitchen", "sku": "A1"}),
            row("bag", superclass="bag", tags={"category": "travel"}),
        ]
    )
    assert [r["name"] for r in index.latest(tags={"category": "travel"})] == ["bag"]
    assert [r["name"] for r in index.latest(tags={"sku": "A1"})] == ["mug"]
    assert [r["name"] for r in index.latest(superclass="mug")] == ["mug"]
    assert index.latest(catalog="other") == []


def test_sql_through_duckdb(tmp_path):
    index = ConceptIndex(Store(str(tmp_path)))
    index.append([row("mug"), row("bag", "failed"), row("cup")])
    result = index.sql("SELECT status, count(*) AS n FROM concepts GROUP BY status ORDER BY status")
    assert result.to_pylist() == [{"status": "failed", "n": 1}, {"status": "succeeded", "n": 2}]


def test_concurrent_writers_lose_no_rows(tmp_path):
    """Two drivers appending to one catalog at once: Delta's optimistic commits keep every row."""
    store = Store(str(tmp_path))
    errors: list[BaseException] = []

    def writer(prefix: str) -> None:
        try:
            index = ConceptIndex(store)
            for batch in range(5):
                index.append([row(f"{prefix}-{batch}-{i}", minute=i) for i in range(3)])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ConceptIndex(store).rows(["name"]).num_rows == 3 * 5 * 3
