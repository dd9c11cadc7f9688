"""Planning a big catalog read from a product table: products/s and driver memory as the catalog grows.

    python -m benchmarks.plan_scale [--sizes 1000,5000,10000] [--photos 3]

For each size, writes a product table (Parquet) of that many products with `--photos` distinct tiny PNGs
each (16x16, random: no two alike) under a temporary folder, then in a fresh process per size times the
two driver steps of `train --dry-run` that grow with the catalog: reading the manifest with its table
(`load_manifest`) and planning (`build_plan`: every photo read, hashed and checked to decode), and reports
the process's peak memory (after the first plan), and a second plan over the unchanged photos (a rerun: the
photo facts the first one stored, pipeline/photo_facts.py); then times the whole `perfusion-batch train
--dry-run` on it (embedded Ray, the
base's fingerprint, the index compared, the plan printed). Prints one row per size, and the per-product cost
and memory growth between the smallest and the largest size. Planning and dry-run only: nothing trains.
Issue 27's targets: 100,000 products x 3 photos in <= 5 minutes on 2 cores, driver memory <= 2 GB, flat.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MANIFEST = """\
version: 1
catalog: plan-scale
root: ./store
base_model: tiny
training: {steps: 4, batch_size: 2}
concepts_from:
  table: products.parquet
  columns: {name: slug, superclass: kind, images: photos, tags: [sku]}
"""


def write_catalog(folder: Path, products: int, photos: int, seed: int = 0) -> Path:
    """folder/products.parquet + folder/photos/<n>.png + folder/catalog.yaml; returns the manifest."""
    rng = np.random.default_rng(seed)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(products):
        paths = []
        for photo in range(photos):
            path = f"photos/{number:07d}-{photo}.png"
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            (folder / path).write_bytes(buffer.getvalue())
            paths.append(path)
        rows.append({"slug": f"sku-{number:07d}", "kind": "mug", "photos": paths, "sku": f"SKU-{number}"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "products.parquet")
    (folder / "catalog.yaml").write_text(MANIFEST)
    return folder / "catalog.yaml"


def measure(manifest_path: str) -> dict[str, float]:
    """In this process: the manifest read and the plan built, timed; the peak RSS after both."""
    from pipeline.manifest import load_manifest
    from pipeline.photo_facts import PhotoFacts
    from pipeline.plan import build_plan
    from pipeline.store import Store

    started = time.perf_counter()
    manifest = load_manifest(manifest_path)
    store = Store(manifest.storage_root())
    loaded = time.perf_counter()
    known = PhotoFacts.load(store)
    plan = build_plan(manifest, "f" * 32, known=known)
    known.save(store)  # as a train run does: the next plan reads only photos that changed
    planned = time.perf_counter()
    assert len(plan) == len(manifest.concepts) and all(item.ready for item in plan)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    again = build_plan(manifest, "f" * 32, known=PhotoFacts.load(store))
    replanned = time.perf_counter()
    assert [p.concept_key for p in again] == [p.concept_key for p in plan]
    return {"load_s": loaded - started, "plan_s": planned - loaded, "replan_s": replanned - planned, "peak_mb": peak_mb}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,10000", help="catalog sizes, comma-separated")
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one manifest, print JSON
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    results = []
    header = "| products | photos | write s | load s | plan s | products/s | peak MB | replan s | replan / plan |"
    print(f"{header} train --dry-run s |\n|{' --- |' * 10}")
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as temp:
        for size in sizes:
            started = time.perf_counter()
            manifest = write_catalog(Path(temp, str(size)), size, args.photos)
            written = time.perf_counter() - started
            out = subprocess.run(  # a fresh process per size: its peak memory is this size's alone
                [sys.executable, "-m", "benchmarks.plan_scale", "--measure", str(manifest)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            figures = json.loads(out.strip().splitlines()[-1])
            rate = size / (figures["load_s"] + figures["plan_s"])
            started = time.perf_counter()
            dry = subprocess.run(
                [sys.executable, "-m", "pipeline", "train", str(manifest), "--dry-run"], capture_output=True, text=True
            )
            dry_run_s = time.perf_counter() - started
            assert dry.returncode == 0 and f"would train {size}," in dry.stdout, dry.stdout[-2000:] + dry.stderr[-2000:]
            results.append((size, figures, rate))
            print(
                f"| {size} | {size * args.photos} | {written:.1f} | {figures['load_s']:.2f} | {figures['plan_s']:.2f} |"
                f" {rate:.0f} | {figures['peak_mb']:.0f} | {figures['replan_s']:.2f} |"
                f" {figures['replan_s'] / figures['plan_s']:.3f} | {dry_run_s:.1f} |",
                flush=True,
            )
    (small, low, _), (large, high, _) = results[0], results[-1]
    per_product_ms = 1000 * ((high["load_s"] + high["plan_s"]) - (low["load_s"] + low["plan_s"])) / (large - small)
    growth_kb = 1024 * (high["peak_mb"] - low["peak_mb"]) / (large - small)
    print(
        f"\nper product (from {small} to {large}): {per_product_ms:.2f} ms, {growth_kb:.1f} KB of driver memory;"
        f" at that rate 100,000 products plan in {per_product_ms * 100:.0f} s"
        f" and grow the driver by {growth_kb * 100_000 / 1024**2:.2f} GB"
    )


if __name__ == "__main__":
    main()
