"""A rerun reads only the photos that changed: what planning learned about each photo is kept in the store
(pipeline/photo_facts.py) and reused while the photo's size and modification time are unchanged."""

from __future__ import annotations

import os

from pipeline import plan as plan_module
from pipeline.manifest import load_manifest
from pipeline.photo_facts import PhotoFacts
from pipeline.plan import build_plan
from pipeline.store import PHOTO_FACTS, Store
from tests.pipeline.conftest import write_catalog


def counting_reads(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    read: list[str] = []
    original = plan_module.read_image
    monkeypatch.setattr(plan_module, "read_image", lambda uri: read.append(uri) or original(uri))
    return read


def test_a_second_plan_reads_only_the_photos_that_changed(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    manifest = load_manifest(write_catalog(tmp_path / "shop", str(tmp_path / "store")))
    read = counting_reads(monkeypatch)
    known = PhotoFacts.load(store)
    first = build_plan(manifest, "fp", known=known)
    assert len(read) == 9 and not store.exists(PHOTO_FACTS)
    known.save(store)

    read.clear()
    again = build_plan(manifest, "fp", known=PhotoFacts.load(store))
    assert read == [] and [p.concept_key for p in again] == [p.concept_key for p in first]
    assert [p.images for p in again] == [p.images for p in first]

    # One photo rewritten (new bytes, new modification time), one made undecodable: only those two are read.
    photo, broken = tmp_path / "shop/photos/bag/1.png", tmp_path / "shop/photos/cup/0.png"
    photo.write_bytes((tmp_path / "shop/photos/mug/0.png").read_bytes())
    broken.write_bytes(b"not a png at all")
    os.utime(photo, ns=(1, 1))  # a modification time of its own, whatever the clock's resolution
    known = PhotoFacts.load(store)
    changed = {p.name: p for p in build_plan(manifest, "fp", known=known)}
    assert sorted(read) == sorted([str(photo), str(broken)])
    assert changed["bag"].concept_key != first[1].concept_key and changed["mug"].concept_key == first[0].concept_key
    (problem,) = changed["cup"].problems
    known.save(store)
    read.clear()
    cached = {p.name: p for p in build_plan(manifest, "fp", known=PhotoFacts.load(store))}
    assert read == [] and cached["cup"].problems == (problem,)  # the same problem, from the facts
    assert cached["bag"].concept_key == changed["bag"].concept_key


def test_a_damaged_facts_file_only_costs_a_full_read(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    manifest = load_manifest(write_catalog(tmp_path / "shop", str(tmp_path / "store")))
    store.put(PHOTO_FACTS, b"not parquet")
    read = counting_reads(monkeypatch)
    planned = build_plan(manifest, "fp", known=PhotoFacts.load(store))
    assert len(read) == 9 and all(p.ready for p in planned)


def test_train_remembers_the_photos_and_validate_and_dry_run_write_nothing(tmp_path, ray_local):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug",))
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(manifest)]).exit_code == 0
    assert runner.invoke(app, ["train", str(manifest), "--dry-run"]).exit_code == 0
    assert not Store(str(root)).exists(PHOTO_FACTS)
    assert runner.invoke(app, ["train", str(manifest)]).exit_code == 0
    assert len(PhotoFacts.load(Store(str(root))).entries) == 3
