"""Claims on work: two runs on one store never train one concept (or render one job) at the same time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from pipeline import leases as leases_module
from pipeline.index import ConceptIndex, RenderIndex
from pipeline.leases import Leases, lease_file
from pipeline.store import Store
from tests.pipeline.conftest import write_catalog


def test_one_run_holds_a_lease_until_it_releases_it_or_dies(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    first, second = Leases(store), Leases(store)
    assert first.claim("key-1") is None
    held = second.claim("key-1")
    assert held is not None and held.startswith(f"run {first.run}, ")
    first.release()
    assert not store.exists(lease_file("key-1"))
    assert second.claim("key-1") is None  # free again
    # A run that dies stops renewing: once its lease expires, the next run takes the work over.
    store.put(lease_file("key-2"), json.dumps({"run": "dead", "expires": time.time() - 1}).encode())
    assert first.claim("key-2") is None and json.loads(store.read(lease_file("key-2")))["run"] == first.run
    monkeypatch.setattr(leases_module, "RENEW_SECONDS", 0.0)
    before = json.loads(store.read(lease_file("key-2")))["expires"]
    time.sleep(0.01)
    first.renew()
    assert json.loads(store.read(lease_file("key-2")))["expires"] > before


def test_two_concurrent_trains_train_each_concept_once_and_two_renders_render_each_image_once(tmp_path):
    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug", "bag"))
    manifest.write_text(
        manifest.read_text()
        + "renders:\n  - {name: shots, prompts: ['a photo of {a}', '{a} next to {b}'], steps: 4,"
        + " images_per_prompt: 3}\n"
    )
    outputs = _twice([sys.executable, "-m", "pipeline", "train", str(manifest)])
    rows = ConceptIndex(Store(str(root))).rows(["name", "status"]).to_pylist()
    assert sorted((r["name"], r["status"]) for r in rows) == [("bag", "succeeded"), ("mug", "succeeded")], outputs
    assert not Store(str(root)).list("leases")  # every lease released

    outputs = _twice([sys.executable, "-m", "pipeline", "render", str(manifest)])
    images = RenderIndex(Store(str(root))).rows(["render_id", "status"]).to_pylist()
    assert len(images) == 9 and {r["status"] for r in images} == {"succeeded"}, outputs  # (2 + 1 pair) x 3
    assert len({r["render_id"] for r in images}) == 9, outputs  # one row per image, not one per run
    listed = subprocess.run(
        [sys.executable, "-m", "pipeline", "renders", "list", "--root", str(root), "--format", "json"],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 9, listed.stdout
    assert not Store(str(root)).list("leases")


def _twice(command: list[str]) -> list[str]:
    """Run command twice at once (two processes, each its own embedded Ray); both must succeed."""
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    return outputs
