"""Concept index query latency: the latest successful concept by name in a 1,000,000-row Delta table.

    python -m benchmarks.index_query [--rows 1000000] [--names 100000] [--commits 10]

Builds the table on local disk (rows spread over `--commits` appends, as batched driver commits leave
them, then compacted once as `ConceptIndex.compact()` would), then times ConceptIndex.get(name) and the
same lookup in SQL through DuckDB for random names. Target: < 1 s.
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
        "file_uri": [f"/store/concepts/{start + i:032x}.safetensors" for i in range(count)],
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
    return pa.Table.from_pydict(columns, schema=CONCEPT_SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        index = ConceptIndex(Store(folder))
        started = time.perf_counter()
        per_commit = args.rows // args.commits
        for commit in range(args.commits):
            write_deltalake(index.uri, synthetic_rows(commit * per_commit, per_commit, args.names, rng), mode="append")
        built = time.perf_counter() - started
        index.compact()
        print(f"index: {args.rows:,} rows, {args.names:,} names, {args.commits} commits, built in {built:.1f}s")
        names = [f"sku-{rng.randrange(args.names):07d}" for _ in range(args.lookups)]
        index.get(names[0])  # warm the OS page cache and the Delta log
        timings = []
        for name in names:
            t = time.perf_counter()
            index.get(name)
            timings.append(time.perf_counter() - t)
        sql_timings = []
        for name in names[:5]:
            t = time.perf_counter()
            index.sql(
                f"SELECT * FROM concepts WHERE name = '{name}' AND status = 'succeeded' "
                "ORDER BY created_at DESC LIMIT 1"
            )
            sql_timings.append(time.perf_counter() - t)
        median = statistics.median(timings)
        print(f"ConceptIndex.get(name): median {median * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms")
        print(f"DuckDB SQL, same lookup: median {statistics.median(sql_timings) * 1000:.0f} ms")
        print(f"latency / 1 s target = {median:.2f}  (<= 1.00 meets the target)")


if __name__ == "__main__":
    main()
