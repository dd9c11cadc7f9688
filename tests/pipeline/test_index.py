"""The concept index (Delta Lake): appends, latest-per-name, filters, SQL, and concurrent writers."""

from __future__ import annotations

import datetime as dt
import threading

import pyarrow.compute as pc
import pytest

from pipeline.index import ConceptIndex, ConceptRow, Status
from pipeline.store import Store


def row(name: str, status: str = "succeeded", minute: int = 0, **extra):
    return ConceptRow(
        concept_key=f"key-{name}-{minute}",
        attempt_id=f"attempt-{name}-{minute}",
        catalog=extra.pop("catalog", "shop"),
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


def test_a_table_written_before_the_operating_point_columns_takes_rows_with_them(tmp_path):
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipeline.index import CONCEPT_SCHEMA, to_arrow_record

    store = Store(str(tmp_path))
    index = ConceptIndex(store)
    new_columns = ["selected_step", "selected_seed", "beta", "tau", "selection_score", "adopted"]
    old_schema = pa.schema([f for f in CONCEPT_SCHEMA if f.name not in new_columns])
    old_record = {k: v for k, v in to_arrow_record(row("mug")).items() if k not in new_columns}
    write_deltalake(index.uri, pa.Table.from_pylist([old_record], schema=old_schema), mode="append")
    index.append(
        [row("bag", selected_step=300, selected_seed=2, beta=0.65, tau=0.2, selection_score=0.31, adopted=True)]
    )
    by_name = {r["name"]: r for r in index.latest()}
    assert by_name["bag"]["selected_step"] == 300 and by_name["bag"]["selection_score"] == pytest.approx(0.31)
    assert by_name["bag"]["adopted"] is True  # a boolean column, not a string
    assert by_name["mug"]["selected_step"] is None and by_name["mug"]["beta"] is None  # the old row reads null
    assert by_name["mug"]["adopted"] is None


def test_reading_a_table_of_several_files_exits_cleanly(tmp_path):
    """Arrow's scanner threads used to outlive a read and abort the process at exit (SIGABRT, exit 134) in
    about a quarter of runs once the table had a few files; with many threads (as on a large machine)."""
    import subprocess
    import sys

    index = ConceptIndex(Store(str(tmp_path)))
    for minute in range(4):  # one file per commit
        index.append([row(f"p{minute}", minute=minute)])
    script = (
        "import pyarrow as pa; pa.set_cpu_count(16); pa.set_io_thread_count(16)\n"
        "from pipeline.index import ConceptIndex; from pipeline.store import Store\n"
        f"index = ConceptIndex(Store({str(tmp_path)!r}))\n"
        "print(len(index.latest()), index.rows(['name']).num_rows)\n"
    )
    codes = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True) for _ in range(8)]
    assert [c.returncode for c in codes] == [0] * 8, [c.stderr[-300:] for c in codes if c.returncode]
    assert {c.stdout.strip() for c in codes} == {"4 4"}


def test_an_index_commit_rides_out_a_storage_outage(tmp_path, monkeypatch):
    import pipeline.index as index_module
    import pipeline.store as store_module

    monkeypatch.setattr(store_module.time, "sleep", lambda seconds: None)
    real_write = index_module.write_deltalake
    outage = iter([OSError("Generic S3 error: error sending request: connection refused")] * 3)

    def flaky_write(*args, **kwargs):
        failure = next(outage, None)
        if failure is not None:
            raise failure
        return real_write(*args, **kwargs)

    monkeypatch.setattr(index_module, "write_deltalake", flaky_write)
    index = ConceptIndex(Store(str(tmp_path)))
    index.append([row("mug")])
    assert [r["name"] for r in index.latest()] == ["mug"]


def test_renders_list_shows_each_image_once_and_only_failures_not_fixed_since(tmp_path):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.index import RenderIndex, RenderRow

    def render_row(render_id: str, status: str, minute: int) -> RenderRow:
        return RenderRow(
            render_id=render_id,
            attempt_id=f"{render_id}-{minute}",
            catalog="shop",
            job="shots",
            template="a photo of {a}",
            prompt=f"a photo of <{render_id}>",
            concept_names=[render_id],
            concept_keys=["k"],
            seed=0,
            settings={},
            base_model="tiny",
            fingerprint="f",
            image_uri=f"renders/{render_id}.png" if status == "succeeded" else None,
            status=Status(status),
            error=None if status == "succeeded" else f"boom {minute}",
            created_at=dt.datetime(2026, 1, 1, 12, minute, tzinfo=dt.UTC),
        )

    RenderIndex(Store(str(tmp_path))).append(
        [
            render_row("fixed", "failed", 0),
            render_row("fixed", "succeeded", 1),  # a later run rendered it
            render_row("broken", "failed", 0),
            render_row("broken", "failed", 2),
            render_row("twice", "succeeded", 0),  # two concurrent runs both rendered it
            render_row("twice", "succeeded", 3),
        ]
    )

    def listed(*flags: str) -> list[dict]:
        result = CliRunner().invoke(app, ["renders", "list", "--root", str(tmp_path), "--format", "json", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    assert sorted(r["prompt"] for r in listed()) == ["a photo of <fixed>", "a photo of <twice>"]
    (failure,) = listed("--failed")
    assert failure["prompt"] == "a photo of <broken>" and failure["error"] == "boom 2"


def test_compact_then_vacuum_leave_one_copy_of_each_row(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    index = ConceptIndex(Store(str(tmp_path)))
    for minute in range(4):
        index.append([row(f"p{minute}", minute=minute)])
    parquet = lambda: sorted((tmp_path / "index" / "concepts").glob("*.parquet"))  # noqa: E731
    assert len(parquet()) == 4
    runner = CliRunner()
    compacted = runner.invoke(app, ["concepts", "compact", "--root", str(tmp_path)])
    assert compacted.exit_code == 0 and "4 file(s) merged into 1" in compacted.output, compacted.output
    assert len(parquet()) == 5  # the merged file beside the old ones: globbing them would double every row
    vacuumed = runner.invoke(app, ["concepts", "vacuum", "--root", str(tmp_path), "--retention-hours", "0"])
    assert vacuumed.exit_code == 0 and "4 unused file(s) deleted" in vacuumed.output, vacuumed.output
    assert len(parquet()) == 1 and len(index.rows(["name"])) == 4


def test_lookups_by_name_read_the_latest_rows_file_and_the_tail_and_stay_exact(tmp_path, monkeypatch):
    from pipeline.store import CONCEPTS_LATEST

    store = Store(str(tmp_path))
    index = ConceptIndex(store)
    index.append([row("mug", minute=1), row("bag", minute=1), row("cup", minute=1)])
    index.append([row("mug", minute=2, catalog="other"), row("bag", "failed", minute=3)])
    index.compact()  # writes the latest-rows file
    assert store.exists(CONCEPTS_LATEST)
    # Committed after it was built: the tail, which lookups scan too.
    index.append([row("cup", minute=5), row("box", minute=5), row("mug", "failed", minute=6)])

    def answers() -> list:
        asked = [
            index.latest(["mug", "bag", "cup", "box", "nope"]),
            index.latest(["mug"], catalog="shop"),
            index.latest(["mug"], catalog="other"),
            index.latest(["cup"], base_model="tiny", method="perfusion", superclass="mug"),
        ]
        return [[(r["name"], r["catalog"], r["created_at"].minute) for r in rows] for rows in asked]

    assert index._latest_candidates(["mug"], pc.field("name").isin(["mug"])) is not None  # the file is used
    fast = answers()
    assert fast == [
        [("bag", "shop", 1), ("box", "shop", 5), ("cup", "shop", 5), ("mug", "other", 2)],
        [("mug", "shop", 1)],
        [("mug", "other", 2)],
        [("cup", "shop", 5)],
    ]
    scanned = []
    monkeypatch.setattr(index, "_latest_candidates", lambda *a: scanned.append(a) or None)
    assert answers() == fast and scanned  # the whole-table scan agrees
    monkeypatch.undo()
    store.put(CONCEPTS_LATEST, b"not parquet")  # a damaged derived file: lookups scan the table instead
    assert answers() == fast
    assert index.latest(["mug", "bag"], status=None)[0]["status"] == "failed"  # bag's last attempt
