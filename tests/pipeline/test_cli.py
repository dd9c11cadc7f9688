"""The perfusion-batch command (Typer CliRunner)."""

from __future__ import annotations

import json

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("perfusion-batch ")


def test_every_command_has_help_text():
    command = get_command(app)
    assert command.commands, "no commands registered"
    for name, sub in command.commands.items():
        assert sub.help and sub.help.strip(), f"{name} has no help"
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, name


def test_demo_trains_saves_reloads_and_renders(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["concepts"]) == {"<demo-mug>", "<demo-bag>"}
    assert summary["base"] == "tiny" and summary["renders"] == 8
    assert len(list((out / "renders").glob("*.png"))) == 8
    assert (out / "contact_sheet.png").stat().st_size > 1000
    for path in summary["concepts"].values():
        assert 1000 < (tmp_path / path).stat().st_size < 8000


@pytest.mark.parametrize("args", [["demo", "--steps", "0"], ["demo", "--base", "huge"], ["no-such-command"]])
def test_bad_flags_are_rejected_with_usage(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2


def test_validate_prints_the_plan_and_names_each_bad_image(tmp_path):
    from tests.pipeline.conftest import write_catalog

    root = tmp_path / "store"
    manifest = write_catalog(tmp_path / "shop", str(root), names=("mug", "bag"))
    good = runner.invoke(app, ["validate", str(manifest)])
    assert good.exit_code == 0, good.output
    assert "test-shop: 2 concept(s), base tiny" in good.output
    assert "mug <mug>: 3 image(s), would train" in good.output
    assert "bag <bag>: 3 image(s), would train" in good.output
    assert not (root / "concepts").exists() and not (root / "index").exists()  # nothing trained, no rows

    (tmp_path / "shop" / "photos" / "bag" / "2.png").write_bytes(b"not a png")
    bad = runner.invoke(app, ["validate", str(manifest)])
    assert bad.exit_code == 1
    assert "bag: cannot train:" in bad.output and "2.png is not a readable image" in bad.output


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_bad_manifest_is_refused_with_every_path_and_starts_nothing(tmp_path, command):
    root = tmp_path / "store"
    manifest = tmp_path / "catalog.yaml"
    manifest.write_text(
        f"version: 1\ncatalog: shop\nroot: {root}\nbase_model: tiny\nconcepts:\n"
        "  - name: mug\n    images: [a.png]\n"
        "  - name: bag\n    superclass: bag\n    images: []\n"
    )
    result = runner.invoke(app, [command, str(manifest)])
    assert result.exit_code == 2
    assert "concepts[0].superclass: field required" in result.output
    assert "concepts[1].images: list should have at least 1 item" in result.output
    escaping = manifest.read_text().replace("name: mug\n", "name: ../../etc\n    superclass: mug\n")
    manifest.write_text(escaping.replace("images: []", "images: [b.png]"))
    result = runner.invoke(app, [command, str(manifest)])
    assert result.exit_code == 2 and "concepts[0].name: '../../etc' is not a valid concept name" in result.output
    assert not root.exists()  # refused before any work: no store, no Ray run


def test_a_missing_manifest_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output


@pytest.mark.parametrize(
    ("flag", "value"), [("--concurrency", "0"), ("--gpus-per-task", "0"), ("--gpus-per-task", "half")]
)
def test_bad_train_flags_name_the_flag(tmp_path, flag, value):
    from tests.pipeline.conftest import write_catalog

    manifest = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug",))
    result = runner.invoke(app, ["train", str(manifest), flag, value])
    assert result.exit_code == 2 and flag in result.output
    assert not (tmp_path / "store").exists()
