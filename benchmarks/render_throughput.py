"""Render throughput: mixed concept combinations vs no concepts, and Ray Data's overhead over a plain loop.

    python -m benchmarks.render_throughput [--base tiny] [--images 55] [--ray-images 440] [--batch 8] [--steps 20]

1. mixed / plain: images/s of ConceptRenderer on batches whose rows use DIFFERENT concept combinations
   (none, one of 4 concepts, a pair) / images/s of the stock diffusers pipeline of the same base rendering
   the same prompts (concept tokens replaced by their superclass word), same batch size and steps.
   Interleaved rounds, median of each. Target >= 0.9.
2. Ray Data overhead: images/s through RenderRun.execute (embedded Ray, Renderer actors, PNGs written,
   rows committed; actor start-up included) / images/s of a plain in-process loop over the same Renderer
   class on the same rows, with the same total torch threads. Target >= 0.85. A run pays a fixed
   start-up (a worker and then each actor import torch/diffusers and load the base, ~12 s on 2 CPU cores):
   measured and printed separately, and amortised over a scheduled render's size (--ray-images).
Concepts are initial concepts (perfusion.initial_concept: what a concept is before training): a trained
one costs the same to render. Random-weight SD1.5 shapes: --base sd15 (a GPU is advised: --device cuda).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import perfusion
from perfusion.training import initial_concept
from pipeline.index import ConceptIndex, now
from pipeline.manifest import parse_manifest
from pipeline.render import RenderOptions, RenderRun
from pipeline.render_plan import plan_job
from pipeline.renderer import Renderer
from pipeline.store import Store
from pipeline.worker import prepare_base

CONCEPTS = (("mug-a", "mug"), ("mug-b", "mug"), ("bag-a", "bag"), ("bag-b", "bag"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--images", type=int, default=55, help="images per round of the mixed / plain figure")
    parser.add_argument("--ray-images", type=int, default=440, help="images of the Ray Data / loop figure")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true", help="only the mixed / plain figure")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = str(Path(folder) / "store")
        manifest = stock_store(root, args)
        run = RenderRun(manifest, RenderOptions(root=root, batch_size=args.batch))
        info = prepare_base(run.base_model, root)
        refs = run.resolve(info.fingerprint)
        rows = plan_job(manifest, manifest.renders[0], refs, info.fingerprint)
        # Sorted by seed: every batch mixes prompts without concepts, with one concept and with a pair.
        records = sorted((row.to_record() for row in rows), key=lambda r: (r["seed"], r["prompt"]))
        print(
            f"base {args.base}, {args.images} + {len(records)} images, batch {args.batch}, {args.steps} steps, "
            f"{torch.get_num_threads()} torch threads"
        )

        mixed_vs_plain(run.base_model, root, info, records[: args.images], args)
        if not args.skip_ray:
            ray_vs_loop(run, root, info, records, args)


def stock_store(root: str, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """A store holding 4 concepts with index rows, and a manifest whose render job mixes combinations."""
    base = perfusion.load_base(args.base)
    store = Store(root)
    index_rows = []
    for name, superclass in CONCEPTS:
        concept = initial_concept(base, f"<{name}>", superclass)
        artifact = store.write_once(f"concepts/{name}.safetensors", concept.to_bytes())
        index_rows.append(
            {
                "concept_key": name,
                "attempt_id": name,
                "catalog": "bench",
                "name": name,
                "token": f"<{name}>",
                "superclass": superclass,
                "base_model": args.base,
                "fingerprint": base.fingerprint,
                "file_uri": artifact.uri,
                "sha256": artifact.sha256,
                "bytes": artifact.bytes,
                "status": "succeeded",
                "created_at": now(),
            }
        )
    ConceptIndex(store).append(index_rows)
    # 1 + 4 + 6 = 11 prompts per seed: rows without concepts, with one, with a pair, interleaved in batches
    seeds = max(1, -(-max(args.images, 0 if args.skip_ray else args.ray_images) // 11))
    text = (
        f"""
version: 1
catalog: bench
base_model: {args.base}
concepts:
"""
        + "".join(f"  - {{name: {n}, superclass: {s}, images: [x.png]}}\n" for n, s in CONCEPTS)
        + f"""
renders:
  - name: mixed
    prompts: ["a photo of a cat on a table", "a photo of {{a}} on a table", "{{a}} next to {{b}} on a table"]
    images_per_prompt: {seeds}
    steps: {args.steps}
    guidance_scale: 4.0
"""
    )
    return parse_manifest(text, str(Path(root).parent / "bench.yaml"))


def mixed_vs_plain(spec: str, root: str, info, records: list[dict], args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    renderer = Renderer(spec, root, info.fingerprint, info.covariance, info.covariance_sha256)
    for record in records:
        renderer._attach(json.loads(record["concepts"]))
    plain = perfusion.load_base(spec)  # stock processors: no Perfusion anywhere
    superclass = dict(CONCEPTS)
    plain_prompts = [r["prompt"] for r in records]
    for name in superclass:
        plain_prompts = [p.replace(f"<{name}>", superclass[name]) for p in plain_prompts]
    settings = perfusion.RenderSettings(steps=args.steps, guidance_scale=4.0, batch_size=args.batch)
    requests = [
        perfusion.RenderRequest(
            r["prompt"], seed=int(r["seed"]), concepts=tuple(c["token"] for c in json.loads(r["concepts"]))
        )
        for r in records
    ]

    def run_mixed() -> None:
        renderer.renderer.render_arrays(requests, settings)

    def run_plain() -> None:
        for start in range(0, len(plain_prompts), args.batch):
            batch = plain_prompts[start : start + args.batch]
            plain.pipeline(
                prompt=batch,
                num_inference_steps=args.steps,
                guidance_scale=4.0,
                output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(len(batch))],
            )

    run_mixed(), run_plain()  # warm-up
    times: dict[str, list[float]] = {"mixed": [], "plain": []}
    for _ in range(args.rounds):
        for label, fn in (("mixed", run_mixed), ("plain", run_plain)):
            started = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - started)
    mixed, plain_time = statistics.median(times["mixed"]), statistics.median(times["plain"])
    n = len(records)
    print(
        f"mixed combinations: {n / mixed:7.2f} images/s   no concepts (stock pipeline): {n / plain_time:7.2f} images/s"
    )
    print(f"throughput ratio mixed / plain = {plain_time / mixed:.3f}  (target >= 0.9)")


def ray_vs_loop(run: RenderRun, root: str, info, records: list[dict], args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    from pipeline import jobs

    # The plain loop: the same Renderer class in this process, all torch threads, same batches, same PNGs.
    loop_root = Path(root).parent / "loop"
    import shutil

    shutil.copytree(root, loop_root)
    moved = [r | {"concepts": r["concepts"].replace(root, str(loop_root))} for r in records]
    started = time.perf_counter()
    renderer = Renderer(run.base_model, str(loop_root), info.fingerprint, info.covariance, info.covariance_sha256)
    for start in range(0, len(moved), args.batch):
        results = renderer.render_records(moved[start : start + args.batch])
        assert all(r["status"] == "succeeded" for r in results), results
    loop = time.perf_counter() - started

    jobs.ensure_ray(num_cpus=torch.get_num_threads())
    first: list[float] = []

    def progress(done: int, total: int, failed: int) -> None:
        if done and not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    summary = run.execute(progress, message=lambda text: None)
    through_ray = time.perf_counter() - started
    assert summary.ok and summary.rendered == len(records), summary
    n = len(records)
    print(
        f"perfusion-batch render (Ray Data, {torch.get_num_threads()} actors x 1 thread): {n / through_ray:7.2f} "
        f"images/s   plain loop ({torch.get_num_threads()} threads): {n / loop:7.2f} images/s"
    )
    print(f"Ray Data ratio = {loop / through_ray:.3f}  (target >= 0.85; start-up included)")
    print(
        f"start-up to the first finished batch: {first[0] - started:.1f} s (prepare task, actors import torch/"
        f"diffusers and load the base, first batch); plain loop per image: {loop / n:.2f} s"
    )


if __name__ == "__main__":
    main()
