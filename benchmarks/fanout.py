"""Fan-out efficiency of `perfusion-batch train` on an embedded Ray, and the per-task overhead.

    python -m benchmarks.fanout [--concepts 6] [--workers 2] [--steps 120]

1. Single-concept times: each concept trained alone in this process with one torch thread (what a Ray
   worker with num_cpus=1 gets), model and C^-1 already loaded: the pure training time t_i.
2. The same catalog through TrainRun on an embedded Ray with `--workers` CPUs: wall time T.
   efficiency ratio = T / (sum t_i / W)   (target <= 1.15; 1.00 would be a perfect split)
3. Per-task overhead, measured directly: Ray round trip of an empty task, reading C^-1 from the store; and,
   once per worker process, importing the project and loading the base model, timed in a fresh process
   (the pipeline overlaps this with prepare_base: TrainRun._warm_workers); as a fraction of the mean t_i.
The default of 120 steps is the example catalog's (manifests/catalog.yaml); on the tiny model a step takes
about 0.1 s on one thread, so a concept trains in ~10 s, far shorter than a real one (minutes on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NAMES = ("mug", "bag", "cup", "pen", "hat", "box", "jar", "fan", "key", "map", "toy", "car")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    import ray

    import perfusion
    from pipeline import jobs, tasks, worker
    from pipeline.manifest import load_manifest
    from pipeline.train import TrainOptions, TrainRun
    from tests.pipeline.conftest import write_catalog

    with tempfile.TemporaryDirectory() as folder:
        names = tuple(f"{NAMES[i % len(NAMES)]}-{i}" for i in range(args.concepts))
        manifest_path = write_catalog(Path(folder) / "shop", str(Path(folder) / "store"), names)
        text = manifest_path.read_text().replace("{steps: 4, batch_size: 2}", f"{{steps: {args.steps}, batch_size: 2}}")
        manifest_path.write_text(text)
        manifest = load_manifest(manifest_path)

        # 1. single-concept times, one thread, everything preloaded
        torch.set_num_threads(1)
        run = TrainRun(manifest)
        base_info = worker.prepare_base(run.base_model, run.store.root)
        plan = [item for item, _ in run.plan(base_info)]
        base = worker.worker_base(run.base_model)
        worker_import, base_load = _fresh_process_load(run.base_model)
        t = time.perf_counter()
        perfusion.covariance_from_bytes(run.store.read(base_info.covariance), base.fingerprint)
        covariance_load = time.perf_counter() - t
        singles = []
        for item in plan:
            task = run._task(item, base_info)
            task = tasks.TrainTask(**{**task.__dict__, "root": str(Path(folder) / "solo"), "file": f"solo/{item.name}"})
            solo_store = tasks.Store(task.root)
            if not solo_store.exists(base_info.covariance):
                solo_store.write_once(base_info.covariance, run.store.read(base_info.covariance))
            t = time.perf_counter()
            row = tasks.train_one(task)
            singles.append(time.perf_counter() - t)
            assert row.status == "succeeded", row
        torch.set_num_threads(args.workers)

        # 2. the pipeline on an embedded Ray
        jobs.ensure_ray(num_cpus=args.workers)
        empty = jobs.remote(lambda: None, num_cpus=1)
        ray.get(empty.remote())
        t = time.perf_counter()
        ray.get([empty.remote() for _ in range(20)])
        round_trip = (time.perf_counter() - t) / 20
        fresh = TrainRun(manifest, TrainOptions())
        t = time.perf_counter()
        summary = fresh.execute()
        wall = time.perf_counter() - t
        assert summary.ok and summary.count("succeeded") == args.concepts, summary.counts()
        ray.shutdown()

    ideal = sum(singles) / args.workers
    mean_single = statistics.mean(singles)
    print(f"tiny model, {args.concepts} concepts x {args.steps} steps, {args.workers} CPU workers (1 thread each)")
    print(f"single-concept training time: mean {mean_single:.2f}s, sum {sum(singles):.1f}s")
    print(f"pipeline wall time: {wall:.1f}s   ideal (sum / workers): {ideal:.1f}s")
    print(f"fan-out efficiency ratio = {wall / ideal:.2f}  (target <= 1.15)")
    print("per-task overhead (once per worker process: import and model load; per task: the rest):")
    for label, seconds in (
        ("Ray task round trip", round_trip),
        ("C^-1 read + parse", covariance_load),
        ("import (fresh process)", worker_import),
        ("base model load (tiny)", base_load),
    ):
        print(f"  {label:<24} {seconds * 1000:8.1f} ms = {seconds / mean_single:6.1%} of a concept's training")


def _fresh_process_load(spec: str) -> tuple[float, float]:
    """(import seconds, model load seconds) in a new Python process, as a new Ray worker pays them."""
    code = (
        "import time; t0 = time.perf_counter(); from pipeline import worker; import perfusion; "
        f"t1 = time.perf_counter(); worker.worker_base({spec!r}); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, second = out.split()[-2:]
    return float(first), float(second)


if __name__ == "__main__":
    main()
