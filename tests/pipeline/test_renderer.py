"""The Ray Data Renderer class without Ray: a batch mixing concept combinations gives the pixels of each row
rendered alone; a failing row is retried then recorded while the others are stored; a damaged concept file
fails its rows only; a PNG left by a dead attempt is adopted, not rendered again."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import perfusion
from perfusion.residual_training import initial_residual_concept
from pipeline.render_plan import ConceptRef, PlannedImage
from pipeline.renderer import Renderer
from pipeline.store import Store
from pipeline.worker import prepare_base

SETTINGS = {
    "steps": 4,
    "guidance_scale": 3.0,
    "resolution": None,
    "scheduler": "default",
    "lock": "local",
    "negative_prompt": "",
    "gates": {},
}
MIXED_TOLERANCE = 1  # uint8 levels: PNG quantizes the float pixels the core compares at 1e-5


@pytest.fixture(scope="module")
def stocked(tmp_path_factory, trained_pair):  # type: ignore[no-untyped-def]
    """A store with the tiny base's C^-1 and the two trained concepts; the refs to them."""
    root = tmp_path_factory.mktemp("renderer") / "store"
    info = prepare_base("tiny", str(root))
    store = Store(str(root))
    refs = {}
    residual = initial_residual_concept(perfusion.load_base("tiny"), "<shoe-r>", "shoe")  # a residual concept,
    generator = torch.Generator().manual_seed(0)  # its A random instead of trained (the mixing is what's tested)
    residual.up = {n: torch.randn(a.shape, generator=generator) * 0.1 for n, a in residual.up.items()}
    for concept in (*trained_pair, residual):
        name = concept.token.strip("<>")
        artifact = store.write_once(f"concepts/{name}.safetensors", concept.to_bytes())
        refs[name] = ConceptRef(name, concept.token, f"key-{name}", artifact.uri, artifact.sha256)
    return root, info, refs


def renderer_for(root, info) -> Renderer:  # type: ignore[no-untyped-def]
    return Renderer("tiny", str(root), info.fingerprint, info.covariance, info.covariance_sha256)


def record(render_id: str, prompt: str, refs: tuple[ConceptRef, ...], seed: int, **settings) -> dict:  # type: ignore[no-untyped-def]
    return PlannedImage(render_id, "job", prompt, prompt, seed, refs, SETTINGS | settings).to_record()


def moved(record: dict, old, new) -> dict:  # type: ignore[no-untyped-def]
    """The record with its concept files' URIs in the copy of the store at `new`."""
    return record | {"concepts": record["concepts"].replace(str(old), str(new))}


def pixels(store: Store, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.read(store.locate(uri)))), dtype=np.int16)


def test_a_mixed_batch_stores_the_pixels_of_each_row_alone(stocked, tmp_path):
    root, info, refs = stocked
    mug, bag, shoe = refs["mug-1"], refs["bag-1"], refs["shoe-r"]
    records = [
        record("r1", "a photo of <mug-1>", (mug,), 1),
        record("r2", "a photo of a dog on the beach", (), 2),
        record("r3", "<mug-1> next to <bag-1> on a wooden table", (mug, bag), 3, gates={"<bag-1>": [0.6, None]}),
        record("r4", "a photo of <bag-1> in a kitchen", (bag,), 4),
        record("r5", "a photo of <shoe-r> on the beach", (shoe,), 5),  # Personalized Residuals
        record("r6", "<shoe-r> next to <bag-1>", (shoe, bag), 6),  # both methods in one row
    ]
    alone_root = tmp_path / "alone"
    shutil.copytree(root, alone_root)
    mixed = renderer_for(root, info).render_records(records)
    single = renderer_for(alone_root, info)  # its own store: the same render_ids are not stored there yet
    alone = [single.render_records([moved(r, root, alone_root)])[0] for r in records]
    assert [r["status"] for r in mixed] == ["succeeded"] * 6
    assert [r["status"] for r in alone] == ["succeeded"] * 6, alone
    for together, by_itself in zip(mixed, alone, strict=True):
        difference = pixels(Store(str(root)), together["image_uri"]) - pixels(
            Store(str(alone_root)), by_itself["image_uri"]
        )
        assert np.abs(difference).max() <= MIXED_TOLERANCE
    assert mixed[0]["sha256"] != mixed[1]["sha256"]  # the concept changed the picture
    assert mixed[4]["sha256"] != mixed[5]["sha256"]


def test_a_failing_row_is_retried_then_recorded_and_the_others_are_stored(stocked, tmp_path, monkeypatch):
    root, info, refs = stocked
    target = tmp_path / "store"
    shutil.copytree(root, target)
    renderer = renderer_for(target, info)
    real_render = renderer._render
    tries: list[list[str]] = []

    def flaky(records):  # type: ignore[no-untyped-def]
        tries.append([r["render_id"] for r in records])
        if any(r["render_id"] == "bad" for r in records):
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_render(records)

    monkeypatch.setattr(renderer, "_render", flaky)
    damaged = ConceptRef("bag-1", "<bag-1>", "key-other", refs["bag-1"].file_uri, "0" * 64)
    results = renderer.render_records(
        [
            moved(record("ok-1", "a photo of <mug-1>", (refs["mug-1"],), 1), root, target),
            moved(record("bad", "a photo of <mug-1>", (refs["mug-1"],), 2), root, target),
            moved(record("damaged", "a photo of <bag-1>", (damaged,), 3), root, target),
            moved(record("ok-2", "a photo of <mug-1>", (refs["mug-1"],), 4), root, target),
        ]
    )
    status = {r["render_id"]: r["status"] for r in results}
    assert status == {"ok-1": "succeeded", "bad": "failed", "damaged": "failed", "ok-2": "succeeded"}
    by_id = {r["render_id"]: r for r in results}
    assert "illegal memory access" in by_id["bad"]["error"]
    assert "checksum mismatch" in by_id["damaged"]["error"]
    assert tries.count(["bad"]) == 2  # the batch once, then the row alone twice
    stored = {p.name for p in (target / "renders").iterdir()}
    assert {"ok-1.png", "ok-2.png"} <= stored and not {"bad.png", "damaged.png"} & stored


def test_a_png_left_by_a_dead_attempt_is_adopted(stocked, tmp_path, monkeypatch):
    root, info, refs = stocked
    target = tmp_path / "store"
    shutil.copytree(root, target)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    Store(str(target)).write_once("renders/left.png", buffer.getvalue())
    renderer = renderer_for(target, info)
    monkeypatch.setattr(renderer, "_render", lambda records: pytest.fail("rendered again"))
    (result,) = renderer.render_records([record("left", "a photo of <mug-1>", (refs["mug-1"],), 1)])
    assert result["status"] == "succeeded" and result["bytes"] == len(buffer.getvalue())
    assert (result["width"], result["height"]) == (32, 32)
    assert result["adopted"] is True  # counted as adopted, not as rendered in ~0 s
