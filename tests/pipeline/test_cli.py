"""The perfusion-batch command (Typer CliRunner)."""

from __future__ import annotations

import json
import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("perfusion-batch ")


def test_every_command_and_sub_command_has_help_text():
    command = get_command(app)
    assert command.commands, "no commands registered"
    paths = []
    for name, sub in command.commands.items():
        paths.append([name])
        paths += [[name, child] for child in getattr(sub, "commands", {})]
    assert ["concepts", "query"] in paths and ["renders", "list"] in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, path
        # A flag shows no type, as if it took a value (`--dry-run <bool>` invites `--dry-run true`).
        assert "<bool>" not in result.output, (path, result.output)
    train_help = runner.invoke(app, ["train", "--help"], terminal_width=120).output
    assert re.search(r"--dry-run +Plan and print", train_help), train_help


def test_a_submitted_run_gets_back_exactly_its_options_as_flags():
    """The Ray Job's entrypoint is rebuilt from the options object: parsing those flags gives the same options."""
    from pipeline.jobs import options_argv
    from pipeline.render import RenderOptions
    from pipeline.train import TrainOptions

    train = TrainOptions(root="s3://b/c", force=True, only=("mug", "bag"), max_concurrency=3, device="gpu")
    argv = options_argv(train)
    assert argv == [
        "--root",
        "s3://b/c",
        "--force",
        "--only",
        "mug",
        "--only",
        "bag",
        "--concurrency",
        "3",
        "--device",
        "gpu",
    ]  # defaults (gpus_per_task 1.0, device None) left to the cluster
    render = RenderOptions(jobs=("pairs",), limit=5, batch_size=4, schedule="nightly", pushgateway="http://g:9091")
    assert options_argv(render) == [
        "--job",
        "pairs",
        "--limit",
        "5",
        "--batch-size",
        "4",
        "--pushgateway",
        "http://g:9091",
        "--schedule",
        "nightly",
    ]
    assert options_argv(TrainOptions()) == []
    # every flag an options field names is one the command really takes
    command = get_command(app)
    for name, options in (("train", train), ("render", render)):
        known = {opt for param in command.commands[name].params for opt in param.opts}
        assert {a for a in options_argv(options) if a.startswith("--")} <= known, name


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
    assert not root.exists()  # planning writes nothing: no concepts, no rows, no covariance

    (tmp_path / "shop" / "photos" / "bag" / "2.png").write_bytes(b"not a png")
    bad = runner.invoke(app, ["validate", str(manifest)])
    assert bad.exit_code == 1
    assert "bag: cannot train:" in bad.output and "2.png cannot be decoded" in bad.output


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


def doctor_lines(output: str) -> dict[str, tuple[str, str]]:
    """check name -> (verdict, detail), from lines like 'ok    storage      /x is writable'."""
    return {line[6:18].strip(): (line[:5].strip(), line[19:]) for line in output.splitlines() if line[:5].strip()
            in {"ok", "warn", "FAIL"}}  # fmt: skip


def test_doctor_passes_on_a_working_setup(tmp_path, monkeypatch):
    from pipeline.doctor import CREDENTIAL_VARIABLES
    from tests.helpers import http_receiver

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    for name in CREDENTIAL_VARIABLES:  # (the S3 tests' fixture may have set some)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
    with http_receiver() as (gateway, _):
        result = runner.invoke(
            app, ["doctor", "--root", str(tmp_path / "store"), "--base", "tiny", "--pushgateway", gateway]
        )
        bare = runner.invoke(app, ["doctor", "--pushgateway", gateway.removeprefix("http://"), "--device", "GPU"])
    # host:port works as prometheus_client takes it; --device is case-insensitive
    assert doctor_lines(bare.output)["pushgateway"] == ("ok", f"{gateway} is healthy")
    assert doctor_lines(bare.output)["gpus"][1].startswith("none on this machine; --device gpu")
    assert result.exit_code == 0, result.output
    lines = doctor_lines(result.output)
    assert set(lines) == {"versions", "ray", "gpus", "storage", "base model", "pushgateway"}
    assert all(verdict in {"ok", "warn"} for verdict, _ in lines.values())
    assert "torch 2." in lines["versions"][1] and "ray 2." in lines["versions"][1]
    assert lines["ray"][1].startswith("no address: runs start an embedded Ray")
    assert lines["storage"] == ("ok", f"{tmp_path / 'store'} is writable; credentials from the environment: "
                                "AWS_SECRET_ACCESS_KEY")  # fmt: skip
    assert lines["base model"][0] == "ok" and "'tiny' loads" in lines["base model"][1]
    assert lines["pushgateway"] == ("ok", f"{gateway} is healthy")
    assert "do-not-print-me" not in result.output
    assert result.output.rstrip().endswith("verdict: ready")
    assert list((tmp_path / "store").iterdir()) == []  # the storage probe cleaned up after itself


def test_doctor_names_each_failure_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-value")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    args = ["--address", "http://127.0.0.1:1", "--root", str(not_a_folder / "store"), "--base", "no-such-model"]
    result = runner.invoke(app, ["doctor", *args, "--pushgateway", "http://127.0.0.1:1"])
    assert result.exit_code == 1
    lines = doctor_lines(result.output)
    assert lines["ray"][0] == lines["storage"][0] == lines["base model"][0] == lines["pushgateway"][0] == "FAIL"
    assert "http://127.0.0.1:1 not reachable" in lines["ray"][1] and "http://HEAD:8265" in lines["ray"][1]
    assert "is not writable" in lines["storage"][1]
    assert "'no-such-model' does not load" in lines["base model"][1]
    assert "verdict: not ready (ray, storage, base model, pushgateway)" in result.output
    assert "secret-token-value" not in result.output


def test_device_flag_and_its_environment_variable():
    from pipeline import jobs

    assert jobs.task_resources("gpu", 0.5) == {"num_gpus": 0.5, "num_cpus": 1}  # even with no GPU in sight
    assert jobs.task_resources("cpu", 1.0) == {"num_cpus": 1}
    with pytest.raises(ValueError, match="device must be one of"):
        jobs.task_resources("tpu", 1.0)
    result = runner.invoke(app, ["render", "catalog.yaml", "--device", "tpu"])
    assert result.exit_code == 2 and "--device" in result.output
    result = runner.invoke(app, ["train", "catalog.yaml"], env={"PERFUSION_BATCH_DEVICE": "tpu"})
    assert result.exit_code == 2 and "tpu" in result.output


def test_inside_a_ray_job_the_address_from_the_environment_is_not_resubmitted(tmp_path, ray_local):
    """In a Ray Job's driver (a KubeRay head pod may carry RAY_API_SERVER_ADDRESS) the run happens right there
    instead of submitting itself again."""
    from tests.pipeline.conftest import write_catalog

    manifest = write_catalog(tmp_path / "shop", str(tmp_path / "store"), names=("mug",))
    # What Ray's job supervisor sets for every entrypoint (test_ray_job.py checks it on a real head).
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}
    result = runner.invoke(app, ["train", str(manifest), "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert "would train 1" in result.output and "submitted" not in result.output


def test_every_error_is_one_line_and_unexpected_ones_exit_1():
    import errno

    import perfusion
    from pipeline.cli.app import describe_error

    class TaskError(Exception):  # what ray.exceptions.RayTaskError carries: the task's own error as .cause
        def __init__(self, cause: BaseException) -> None:
            super().__init__("Traceback (most recent call last):\n  ...")
            self.cause = cause

    assert describe_error(TaskError(perfusion.TrainingError("concept 'mug': no images"))) == (
        True,
        "concept 'mug': no images",
    )
    known, line = describe_error(OSError(errno.EROFS, "Read-only file system", "/data/store/index"))
    assert known and line.startswith("/data/store/index: permission denied or read-only")
    known, line = describe_error(RuntimeError("boom\nsecond line"))
    assert not known and line == "unexpected RuntimeError: boom (set PERFUSION_BATCH_DEBUG=1 for the traceback)"
