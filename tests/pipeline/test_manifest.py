"""The manifest schema: defaults, overrides, and every kind of bad input reported at once with its path."""

from __future__ import annotations

import textwrap

import pytest

import perfusion
from pipeline.manifest import ManifestError, load_manifest, parse_manifest

GOOD = """
version: 1
catalog: shop
root: ./store
base_model: tiny
training: {steps: 20, batch_size: 4}
concepts:
  - name: red-mug
    superclass: mug
    images: [mugs/*.png]
    tags: {sku: A-1, category: kitchen}
  - name: blue-bag
    token: <bag-7>
    superclass: bag
    images: [bags/a.png, bags/b.png]
    training: {steps: 35, lock_keys: false, lr_schedule: cosine, average_tail: 0.5}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(textwrap.dedent(text), "catalog.yaml")
    return [str(p) for p in caught.value.problems]


def test_a_good_manifest_parses_with_defaults_and_overrides():
    manifest = parse_manifest(GOOD, "/data/shop/catalog.yaml")
    mug, bag = manifest.concepts
    assert mug.concept_token == "<red-mug>"  # derived from the name
    assert bag.concept_token == "<bag-7>"
    assert manifest.training_config(mug) == {"steps": 20, "batch_size": 4}
    assert manifest.training_config(bag) == {
        "steps": 35,
        "batch_size": 4,
        "lock_keys": False,
        "lr_schedule": "cosine",
        "average_tail": 0.5,
    }
    assert perfusion.TrainConfig(**manifest.training_config(bag)).average_tail == 0.5  # fields match TrainConfig
    assert mug.tags == {"sku": "A-1", "category": "kitchen"}
    assert manifest.resolve("mugs/*.png") == "/data/shop/mugs/*.png"  # relative to the manifest's folder
    assert manifest.resolve("s3://bucket/x.png") == "s3://bucket/x.png"


def test_every_problem_is_reported_with_its_path():
    found = problems_of(
        """
        version: 1
        catalog: shop
        concepts:
          - name: mug
            superclass: mug
            images: [a.png]
          - name: bag
            images: [b.png]
          - name: mug
            superclass: cup
            images: []
            training: {stepz: 3}
        """
    )
    assert "concepts[1].superclass: field required" in found
    assert "concepts[2].images: list should have at least 1 item after validation, not 0" in found
    assert any(p.startswith("concepts[2].training.stepz: unknown field") for p in found)
    assert len(found) == 3  # schema errors first; the duplicate name is checked once the schema holds


def test_duplicates_bad_tokens_and_escaping_names_are_refused():
    found = problems_of(
        """
        version: 1
        catalog: shop
        concepts:
          - {name: mug, superclass: mug, images: [a.png]}
          - {name: mug, superclass: mug, images: [b.png], token: <other>}
          - {name: cup, superclass: cup, images: [c.png], token: <mug>}
          - {name: ../../etc, superclass: x, images: [d.png]}
          - {name: Bad Name, superclass: x, images: [e.png], token: "<ok-token>"}
          - {name: tok, superclass: x, images: [f.png], token: "has space"}
        """
    )
    assert "concepts[1].name: duplicate name 'mug' (also concepts[0])" in found
    assert "concepts[2].token: duplicate token '<mug>' (also concepts[0])" in found
    assert any(p.startswith("concepts[3].name: '../../etc' is not a valid concept name") for p in found)
    assert any(p.startswith("concepts[4].name: 'Bad Name' is not a valid concept name") for p in found)
    assert any(p.startswith("concepts[5].token: 'has space' is not a valid concept token") for p in found)


def test_version_yaml_and_shape_errors_are_clear():
    assert problems_of("version: 2\ncatalog: x\nconcepts: [{name: a, superclass: b, images: [c]}]") == [
        "version: unsupported manifest version 2: this release reads version 1"
    ]
    (message,) = problems_of("version: 1\ncatalog: [unclosed\n")
    assert message.startswith("not valid YAML: line 3")
    assert problems_of("- just\n- a list\n") == ["expected a mapping with version, catalog and concepts"]
    assert problems_of("version: 1\ncatalog: x\nconcepts: []\n") == [
        "concepts: none given: list them here, or give a product table in concepts_from"
    ]


def test_bad_training_values_are_refused_by_field():
    found = problems_of(
        """
        version: 1
        catalog: shop
        training: {steps: 0, method: dreambooth, lr_schedule: linear, average_tail: 1.0}
        concepts:
          - {name: mug, superclass: mug, images: [a.png], training: {batch_size: 6, grad_accumulation: 4}}
        """
    )
    assert "training.steps: input should be greater than or equal to 1" in found
    assert any(
        p.startswith("training.method: input should be 'perfusion', 'textual_inversion', 'residuals' or 'zero-shot'")
        for p in found
    )
    assert any(p.startswith("training.lr_schedule: input should be 'constant' or 'cosine'") for p in found)
    assert "training.average_tail: input should be less than 1" in found


def test_cross_field_rules_run_after_the_schema(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "version: 1\ncatalog: shop\nconcepts:\n"
        "  - {name: mug, superclass: mug, images: [a.png], training: {batch_size: 6, grad_accumulation: 4}}\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert [str(p) for p in caught.value.problems] == [
        "concepts[0].training.batch_size: must be a multiple of grad_accumulation"
    ]
    assert str(path) in str(caught.value)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_manifest_errors_pickle():
    import pickle

    error = ManifestError("m.yaml", [])
    assert isinstance(pickle.loads(pickle.dumps(error)), ManifestError)


def test_the_manifest_resolves_its_storage_root_and_base_model(tmp_path, monkeypatch):
    (tmp_path / "models" / "sd").mkdir(parents=True)
    path = tmp_path / "catalog.yaml"
    text = GOOD.replace("root: ./store", "root: ./out").replace("base_model: tiny", "base_model: models/sd")
    path.write_text(text)
    manifest = load_manifest(str(path))
    monkeypatch.delenv("PERFUSION_BATCH_ROOT", raising=False)
    assert manifest.storage_root() == str(tmp_path / "out")  # relative to the manifest's folder
    monkeypatch.setenv("PERFUSION_BATCH_ROOT", "s3://bucket/env")
    assert manifest.storage_root() == "s3://bucket/env"
    assert manifest.storage_root("s3://bucket/flag") == "s3://bucket/flag"  # the flag wins
    assert manifest.base_model_path() == str(tmp_path / "models" / "sd")
    for spec in ("toy", "tiny", "someone/hub-model"):  # built-ins and hub ids stay as they are
        assert manifest.model_copy(update={"base_model": spec}).base_model_path() == spec


def test_the_training_schema_is_train_config_and_tokens_follow_the_library():
    from dataclasses import fields

    from pipeline.manifest import SelectSettings, TrainingSettings

    assert set(TrainingSettings.model_fields) == {f.name for f in fields(perfusion.TrainConfig)} | {"select"}
    assert set(SelectSettings.model_fields) == {f.name for f in fields(perfusion.SelectConfig)} | {"every"}
    name = "a" * 64  # a valid name (it names files) whose token <aaa...a> is one character too long
    found = problems_of(
        f"version: 1\ncatalog: shop\nconcepts:\n  - {{name: {name}, superclass: mug, images: [a.png]}}\n"
    )
    assert len(found) == 1 and found[0].startswith(f"concepts[0].name: '<{name}>' is not a valid concept token")
    with pytest.raises(perfusion.ConceptTokenError):  # the same rule training applies
        perfusion.tokens.validate_token(f"<{name}>", perfusion.load_base("tiny").tokenizer)
    text = (
        f"version: 1\ncatalog: shop\nconcepts:\n  - {{name: {name}, token: <ok-1>, superclass: mug, images: [a.png]}}\n"
    )
    assert parse_manifest(text).concepts[0].concept_token == "<ok-1>"  # a long name with its own token is fine
    shop = parse_manifest(
        "version: 1\ncatalog: shop\ntraining: {templates: ['a photo of {}'], ema_decay: 0.9}\n"
        "concepts:\n  - {name: mug, superclass: mug, images: [a.png]}\n"
    )
    config = perfusion.TrainConfig(**shop.training_config(shop.concepts[0]))
    assert config.templates == ("a photo of {}",) and config.ema_decay == 0.9
    assert problems_of(
        "version: 1\ncatalog: shop\ntraining: {templates: ['no placeholder']}\n"
        "concepts:\n  - {name: mug, superclass: mug, images: [a.png]}\n"
    ) == ["training.templates: must be non-empty and each contain '{}' for the concept"]


def test_reading_a_manifest_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.manifest import parse_manifest; "
        "parse_manifest('version: 1\\ncatalog: s\\nconcepts:\\n  - {name: m, superclass: mug, images: [a.png]}\\n'); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


SELECTING = """
version: 1
catalog: shop
base_model: tiny
training: {steps: 40, select: {every: 10, scorer: "clip:models/clip"}}
concepts:
  - {name: red-mug, superclass: mug, images: [m.png], training: {select: {seeds: 3, gate: false}}}
  - {name: blue-bag, superclass: bag, images: [b.png], training: {select: {scorer: none}}}
  - {name: green-cup, superclass: cup, images: [c.png]}
renders:
  - {name: mugs, prompts: ["{a}"], concepts: {names: [red-mug]}, gates: {red-mug: {beta: 0.6}}}
"""


def test_training_select_merges_per_field_and_sets_the_scoring_cadence():
    manifest = parse_manifest(SELECTING, "/data/shop/catalog.yaml")
    mug, bag, cup = manifest.concepts
    assert manifest.training_config(mug) == {"steps": 40, "select_every": 10}  # `select` is not a TrainConfig field
    assert manifest.selection(mug) == perfusion.SelectConfig(scorer="clip:/data/shop/models/clip", seeds=3, gate=False)
    assert manifest.selection(bag) is None  # scorer none: no selection
    assert manifest.selection(cup) == perfusion.SelectConfig(scorer="clip:/data/shop/models/clip")
    assert parse_manifest(GOOD, "catalog.yaml").selection(parse_manifest(GOOD).concepts[0]) is None


def test_bad_selection_and_gate_overrides_are_refused_with_their_paths():
    text = (
        SELECTING.replace("base_model: tiny", "base_model: toy")
        .replace('scorer: "clip:models/clip"', "scorer: bert")
        .replace("seeds: 3, gate: false", "every: 50, seeds: 0")
        .replace("{scorer: none}", "{scorer: toy}")
        .replace("gates: {red-mug:", "gates: {blue-bag:")
    )
    found = problems_of(text)
    assert "concepts[0].training.select.seeds: input should be greater than or equal to 1" in found
    found = problems_of(text.replace("seeds: 0", "seeds: 1"))
    assert any(p.startswith("training.select.scorer: 'bert' is not a scorer: use 'toy'") for p in found)
    assert "concepts[0].training.select.every: 50 is more than the 40 training steps: use at most 40" in found
    assert any(p.startswith("renders[0].gates.blue-bag: 'blue-bag' is not rendered by this job") for p in found)
    on_sd = problems_of(SELECTING.replace("{scorer: none}", "{scorer: toy}"))
    assert any(p.startswith("concepts[1].training.select.scorer: 'toy' scores the toy base only") for p in on_sd)


def test_a_key_given_twice_is_refused_with_both_lines():
    found = problems_of(
        """
        version: 1
        catalog: shop
        concepts:
          - name: red-mug
            superclass: mug
            superclass: cup
            images: [a.png]
        concepts:
          - name: blue-bag
            superclass: bag
            images: [b.png]
        """
    )
    assert found == [
        "line 7: duplicate key 'superclass' (first on line 6): keep one",
        "line 9: duplicate key 'concepts' (first on line 4): keep one",
    ]


def test_infinite_and_nan_settings_and_symbol_superclasses_are_refused():
    found = problems_of(
        """
        version: 1
        catalog: shop
        training: {lr_value: .inf, train_beta: .nan}
        concepts:
          - {name: red-mug, superclass: mug, images: [a.png]}
        renders:
          - {name: shots, prompts: ["{a}"], guidance_scale: -.inf, gates: {red-mug: {beta: .nan}}}
        """
    )
    assert found == [
        "training.lr_value: input should be a finite number",
        "training.train_beta: input should be a finite number",
        "renders[0].guidance_scale: input should be a finite number",
        "renders[0].gates.red-mug.beta: input should be a finite number",
    ]
    symbols = problems_of(
        """
        version: 1
        catalog: shop
        concepts:
          - {name: red-mug, superclass: "st@r<>{}", images: [a.png]}
          - {name: bear, superclass: teddy bear, images: [a.png]}
        """
    )
    assert symbols == [
        "concepts[0].superclass: 'st@r<>{}' is not a superclass phrase: use 1-64 characters: words of letters or "
        "digits, separated by spaces, '-' or \"'\", e.g. 'teddy bear'"
    ]
    with pytest.raises(perfusion.TrainingError, match="lr_value must be a finite number, not inf"):
        perfusion.TrainConfig(lr_value=float("inf"))


def test_a_thousand_concepts_in_a_five_placeholder_prompt_plan_lazily_and_say_the_cap():
    import math
    import time
    import tracemalloc

    from pipeline.render_plan import capped_prompts, combination_count, combinations_for, planned_images

    concepts = "".join(f"  - {{name: p{i:04d}, superclass: mug, images: [a.png]}}\n" for i in range(1000))
    manifest = parse_manifest(
        "version: 1\ncatalog: shop\nconcepts:\n" + concepts + "renders:\n"
        "  - {name: scene, prompts: ['{a} {b} {c} {d} {e} on a shelf', 'a photo of {a}'], max_combinations: 50,"
        " images_per_prompt: 2}\n"
    )
    job = manifest.renders[0]
    tracemalloc.start()
    started = time.perf_counter()
    combos = combinations_for(manifest, job, job.prompts[0])
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert combos[0] == ("p0000", "p0001", "p0002", "p0003", "p0004") and len(combos) == 50
    assert seconds < 5 and peak < 50_000_000  # the first 50 of ~8e12, not all of them
    assert combination_count(manifest, job, job.prompts[0]) == math.comb(1000, 5)
    assert planned_images(manifest, job) == (50 + 50) * 2
    assert capped_prompts(manifest, manifest.renders) == [
        f"scene prompts[0]: {math.comb(1000, 5):,} combinations, the first 50 rendered (max_combinations)",
        "scene prompts[1]: 1,000 combinations, the first 50 rendered (max_combinations)",
    ]
