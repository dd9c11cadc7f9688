"""One training task without Ray: the method seam (the file and the row say which method made a concept)
and the retry decision (bad input is a failed row, a transient failure is raised for Ray to retry)."""

from __future__ import annotations

import pytest

import perfusion
from pipeline.index import ConceptIndex, Status
from pipeline.manifest import ManifestError, load_manifest
from pipeline.tasks import train_one
from pipeline.train import TrainRun
from pipeline.worker import TransientError, is_transient, prepare_base
from tests.pipeline.conftest import write_catalog


def planned(tmp_path, methods: dict[str, str] | None = None, root: str | None = None):
    """A two-concept catalog (mug, bag) planned; methods: concept name -> its training.method."""
    manifest_path = write_catalog(tmp_path / "shop", root or str(tmp_path / "store"), names=("mug", "bag"))
    text = manifest_path.read_text()
    for name, method in (methods or {}).items():
        text = text.replace(f"  - name: {name}\n", f"  - name: {name}\n    training: {{method: {method}}}\n")
    manifest_path.write_text(text)
    run = TrainRun(load_manifest(manifest_path))
    base = prepare_base(run.base_model, run.store.root)
    return run, base, {item.name: run._task(item, base) for item, _ in run.plan(base)}


def test_the_concept_file_and_its_row_say_which_method_made_it(tmp_path):
    run, _, tasks = planned(tmp_path, {"bag": "textual_inversion"})
    rows = {name: train_one(task) for name, task in tasks.items()}
    assert {name: row.status for name, row in rows.items()} == {"mug": Status.SUCCEEDED, "bag": Status.SUCCEEDED}
    assert rows["mug"].method == "perfusion" and rows["bag"].method == "textual_inversion"
    for name, row in rows.items():
        data = run.store.read(run.store.locate(row.file_uri), row.sha256)
        assert perfusion.methods.file_method(data).name == row.method
        concept = perfusion.load_concept_file(data)
        assert concept.method == row.method and concept.edits == (name == "mug")
    run.index.append(list(rows.values()))
    assert [r["name"] for r in ConceptIndex(run.store).latest(method="textual_inversion")] == ["bag"]


def test_the_method_is_part_of_the_concept_key(tmp_path):
    root = str(tmp_path / "store")  # one store: C^-1 is estimated once
    _, _, perfusion_tasks = planned(tmp_path / "a", root=root)
    _, _, mixed_tasks = planned(tmp_path / "b", {"bag": "textual_inversion"}, root=root)
    assert perfusion_tasks["mug"].concept_key == mixed_tasks["mug"].concept_key
    assert perfusion_tasks["bag"].concept_key != mixed_tasks["bag"].concept_key


def test_one_catalog_trains_both_methods_and_each_file_and_row_says_its_own(tmp_path):
    run, _, tasks = planned(tmp_path, {"bag": "residuals"})
    assert tasks["bag"].training["method"] == "residuals"
    assert tasks["bag"].training["batch_size"] == tasks["mug"].training["batch_size"]  # the catalog's value wins
    rows = {name: train_one(task) for name, task in tasks.items()}
    assert {name: (row.status, row.method) for name, row in rows.items()} == {
        "mug": (Status.SUCCEEDED, "perfusion"),
        "bag": (Status.SUCCEEDED, "residuals"),
    }
    assert rows["bag"].method_version == "residuals-1" and rows["bag"].beta is None
    data = run.store.read(run.store.locate(rows["bag"].file_uri), rows["bag"].sha256)
    concept = perfusion.load_concept_file(data, perfusion.load_base("tiny"), name=rows["bag"].file_uri)
    assert concept.method == "residuals" and concept.superclass == "bag"
    run.index.append(list(rows.values()))
    assert [r["name"] for r in ConceptIndex(run.store).latest(method="residuals")] == ["bag"]
    _, _, perfusion_tasks = planned(tmp_path / "b", root=str(tmp_path / "store"))
    assert perfusion_tasks["bag"].concept_key != tasks["bag"].concept_key  # the method is part of the key


def test_a_misspelled_method_and_selection_of_a_residual_concept_stop_the_manifest(tmp_path):
    expected = (
        r"concepts\[1\]\.training\.method: input should be 'perfusion', 'textual_inversion', 'residuals' or 'zero-shot'"
    )
    with pytest.raises(ManifestError, match=expected):
        planned(tmp_path / "misspelled", {"bag": "residual"})
    manifest_path = write_catalog(tmp_path / "select", str(tmp_path / "store"), names=("mug", "bag"))
    text = manifest_path.read_text().replace(
        "  - name: bag\n", "  - name: bag\n    training: {method: residuals, select: {scorer: toy}}\n"
    )
    manifest_path.write_text(text.replace("base_model: tiny", "base_model: toy"))
    with pytest.raises(ManifestError, match=r"concepts\[1\]\.training\.select\.scorer: step selection .* no gate"):
        load_manifest(manifest_path)


def test_an_unknown_method_in_a_concept_file_is_named():
    concept = perfusion.training.initial_concept(perfusion.load_base("tiny"), "<mug>", "mug")
    concept.method = "dreambooth"
    with pytest.raises(perfusion.ConceptFileError, match=r"method 'dreambooth'.*upgrade"):
        perfusion.load_concept_file(concept.to_bytes())


def test_bad_input_is_a_failed_row_and_a_transient_failure_is_raised_for_a_retry(tmp_path, monkeypatch):
    run, _, tasks = planned(tmp_path)
    # an image deleted after planning: another try cannot bring it back
    first_image = tasks["mug"].images[0][0]
    (tmp_path / "shop" / first_image.split("/shop/", 1)[1]).unlink()
    row = train_one(tasks["mug"])
    assert row.status == Status.FAILED and "FileNotFoundError" in (row.error or "")
    assert row.catalog == "test-shop" and row.method == "perfusion" and row.tags["sku"] == "SKU-0"
    # storage that times out: worth another try, so it is raised (Ray retries TransientError)
    import fsspec

    def flaky(*args, **kwargs):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(fsspec, "open", flaky)
    with pytest.raises(TransientError, match="TimeoutError: read timed out"):
        train_one(tasks["bag"])
    assert not run.store.exists(tasks["bag"].file)


def test_the_retry_decision():
    assert is_transient(TimeoutError()) and is_transient(ConnectionError()) and is_transient(RuntimeError("CUDA"))
    assert not is_transient(perfusion.TrainingError("bad image"))
    assert not is_transient(ValueError("bad value")) and not is_transient(FileNotFoundError("gone"))


def _selecting(tmp_path, scorer: str):
    manifest_path = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug",))
    text = manifest_path.read_text().replace(
        "training: {steps: 4, batch_size: 2}",
        f'training: {{steps: 4, batch_size: 2, select: {{every: 2, scorer: "{scorer}", samples: 1, gate: false}}}}',
    )
    manifest_path.write_text(text)
    run = TrainRun(load_manifest(manifest_path))
    return run, prepare_base(run.base_model, run.store.root)


def test_a_selected_concept_records_its_operating_point_in_its_file_and_row(tmp_path, tiny_clip):
    run, base = _selecting(tmp_path, f"clip:{tiny_clip}")
    [(item, status)] = run.plan(base)
    assert status == Status.PLANNED and item.selection.samples == 1
    _, _, plain = planned(tmp_path / "plain")
    assert item.concept_key != plain["mug"].concept_key  # selection is part of the key
    row = train_one(run._task(item, base))
    assert row.status == Status.SUCCEEDED, row.error
    concept = perfusion.load_concept_file(run.store.read(run.store.locate(row.file_uri), row.sha256))
    selection = concept.metadata["selection"]
    assert row.selected_step == selection["step"] in (2, 4) and row.selected_seed == selection["seed"] == 0
    assert row.selection_score == selection["score"] == concept.metadata["selected_score"]
    assert (row.beta, row.tau) == (concept.beta, concept.tau) == (0.7, 0.15)  # gate: false keeps the default
    run.index.append([row])
    assert ConceptIndex(run.store).get("mug")["selected_step"] == row.selected_step


def test_a_scorer_folder_that_is_not_a_clip_stops_the_plan(tmp_path):
    (tmp_path / "not-clip").mkdir()
    run, base = _selecting(tmp_path, f"clip:{tmp_path / 'not-clip'}")
    with pytest.raises(ManifestError, match=r"training\.select\.scorer: CLIP folder .*not-clip has no config.json"):
        run.plan(base)
