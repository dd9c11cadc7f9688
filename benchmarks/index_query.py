"""Concept index query latency: the latest successful concept by name in a 1,000,000-row Delta table.

    python -m benchmarks.index_query [--rows 1000000] [--names 100000] [--commits 10]

Builds the table on local disk (rows spread over `--commits` appends, as batched driver commits leave
them, then compacted once as `ConceptIndex.compact()` would), then times ConceptIndex.get(name) and the
same lookup in SQL through DuckDB for random names, before compaction (a whole-table scan), just after it
(the latest-rows file) and with `--tail` rows committed since (the file plus the tail). Targets (issue 29):
median < 20 ms, p99 < 100 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time

import pyarrow as pa
from deltalake import write_deltalake

from pipeline.index import CONCEPT_SCHEMA, ConceptIndex
from pipeline.store import Store


def synthetic_rows(start: int, count: int, names: int, rng: random.Random) -> pa.Table:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    picks = [rng.randrange(names) for _ in range(count)]
    columns = {
        "concept_key": [f"{start + i:032x}" for i in range(count)],
        "attempt_id": [f"{start + i:032x}" for i in range(count)],
        "catalog": ["bench"] * count,
        "name": [f"sku-{p:07d}" for p in picks],
        "token": [f"<sku-{p:07d}>" for p in picks],
        "superclass": ["mug"] * count,
        "tags": ['{"category": "kitchen"}'] * count,
        "base_model": ["toy"] * count,
        "fingerprint": ["f" * 64] * count,
        "method": ["perfusion"] * count,
        "method_version": ["perfusion-1"] * count,
        "file_uri": [f"concepts/{start + i:032x}.safetensors" for i in range(count)],
        "sha256": ["0" * 64] * count,
        "bytes": [33184] * count,
        "status": ["succeeded" if rng.random() < 0.95 else "failed" for _ in range(count)],
        "error": [None] * count,
        "steps": [400] * count,
        "final_loss": [0.1] * count,
        "seconds": [180.0] * count,
        "device": ["cuda@node"] * count,
        "created_at": [base + dt.timedelta(seconds=start + i) for i in range(count)],
        "manifest_uri": ["catalog.yaml"] * count,
    }
    columns |= {f.name: [None] * count for f in CONCEPT_SCHEMA if f.name not in columns}  # the optional ones
    return pa.Table.from_pydict(columns, schema=CONCEPT_SCHEMA)


def _timed(lookup, names: list[str]) -> list[float]:  # type: ignore[no-untyped-def]
    lookup(names[0])  # warm the OS page cache and the Delta log
    timings = []
    for name in names:
        started = time.perf_counter()
        lookup(name)
        timings.append(time.perf_counter() - started)
    return sorted(timings)


def _line(label: str, timings: list[float]) -> str:
    median, p99 = statistics.median(timings), timings[min(len(timings) - 1, int(0.99 * len(timings)))]
    return (
        f"{label}: median {median * 1000:.1f} ms ({median / TARGET_MEDIAN:.2f} of the 20 ms target),"
        f" p99 {p99 * 1000:.1f} ms ({p99 / TARGET_P99:.2f} of the 100 ms target)"
    )


TARGET_MEDIAN, TARGET_P99 = 0.020, 0.100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--tail", type=int, default=10_000, help="rows committed after the compaction")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        index = ConceptIndex(Store(folder))
        started = time.perf_counter()
        per_commit = args.rows // args.commits
        for commit in range(args.commits):
            write_deltalake(index.uri, synthetic_rows(commit * per_commit, per_commit, args.names, rng), mode="append")
        built = time.perf_counter() - started
        print(f"index: {args.rows:,} rows, {args.names:,} names, {args.commits} commits, built in {built:.1f}s")
        names = [f"sku-{rng.randrange(args.names):07d}" for _ in range(args.lookups)]
        scan = _timed(index.get, names[: max(5, args.lookups // 10)])
        print(_line("uncompacted, whole-table scan", scan))
        started = time.perf_counter()
        index.compact()  # merges files and writes the latest-rows file
        print(f"compact (with the latest-rows file): {time.perf_counter() - started:.1f}s")
        compacted = _timed(index.get, names)
        print(_line("ConceptIndex.get(name), just compacted", compacted))
        write_deltalake(index.uri, synthetic_rows(args.rows, args.tail, args.names, rng), mode="append")
        with_tail = _timed(index.get, names)
        print(_line(f"ConceptIndex.get(name), {args.tail:,} rows committed since", with_tail))
        sql = _timed(
            lambda name: index.sql(
                f"SELECT * FROM concepts WHERE name = '{name}' AND status = 'succeeded' "
                "ORDER BY created_at DESC LIMIT 1"
            ),
            names[:5],
        )
        print(f"DuckDB SQL over the whole table, same lookup: median {statistics.median(sql) * 1000:.0f} ms")
        speedup = statistics.median(scan) / statistics.median(compacted)
        print(f"speed-up of the lookup over the whole-table scan: {speedup:.1f}x")


if __name__ == "__main__":
    main()
