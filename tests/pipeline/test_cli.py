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
