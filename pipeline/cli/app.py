"""The Typer app, the options the commands share, and the one place domain errors become messages."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Iterator
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
import typer.core

from pipeline.metrics import PUSHGATEWAY_ENV
from pipeline.store import ROOT_ENV

if TYPE_CHECKING:
    from pipeline.manifest import Manifest

# transformers warns at import about an image processor we never use (the safety checker's); keep the
# terminal for our own messages. Set TRANSFORMERS_VERBOSITY yourself to see everything.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _flags_show_no_type() -> None:
    """Typer's rich help prints every option's Python type, flags too ("--dry-run <bool>", "--help <bool>"),
    which reads as if a flag took a value: `--dry-run true` is then refused. Flags show no type column."""
    option = typer.core.TyperOption
    shown = option.display_type_rich

    def display_type_rich(self: typer.core.TyperOption, ctx: typer.Context) -> str | None:
        return "" if self.is_flag else shown(self, ctx)

    option.display_type_rich = display_type_rich  # type: ignore[method-assign,assignment]


_flags_show_no_type()

app = typer.Typer(
    name="perfusion-batch",
    help="Personalize text-to-image models at catalog scale with Perfusion concepts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        # Package metadata, not `import perfusion`: the version should not wait for torch and diffusers.
        typer.echo(f"perfusion-batch {importlib.metadata.version('perfusion-batch')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Personalize text-to-image models at catalog scale with Perfusion concepts."""


# -- errors ----------------------------------------------------------------------------------------------

# Exit codes: 0 all done; 1 some items failed (each recorded with its error) or a check failed; 2 bad input
# (a manifest, flag, store or base model problem): nothing ran.
BAD_INPUT = 2


def fail(message: str, code: int = BAD_INPUT) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


DEBUG_ENV = "PERFUSION_BATCH_DEBUG"  # set to 1 to see the traceback of an unexpected error


@contextlib.contextmanager
def user_errors(code: int = BAD_INPUT) -> Iterator[None]:
    """Every error becomes one line `error: MESSAGE`, never a traceback: a domain, storage or OS error (also
    inside a Ray task's error) with exit `code`; anything unexpected with exit 1 and how to see its traceback."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        known, message = describe_error(error)
        raise fail(message, code if known else 1) from None


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the run, `kill`) unwinds like Ctrl-C, so finished work is committed on
    the way out (the run's finally blocks) instead of the process dying where it stands."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_error(error: BaseException) -> tuple[bool, str]:
    """(whether it is an input or environment problem, its one line): the one place errors become messages."""
    import perfusion
    from pipeline.manifest import ManifestError
    from pipeline.render_plan import RenderPlanError
    from pipeline.store import StoreError, storage_problem

    cause = getattr(error, "cause", None)  # a ray.exceptions.RayTaskError carries the task's own error
    if isinstance(cause, BaseException) and cause is not error:
        return describe_error(cause)
    if isinstance(error, ManifestError | StoreError | RenderPlanError | perfusion.PerfusionError):
        return True, str(error)
    if isinstance(error, OSError) or type(error).__module__.startswith(("botocore", "aiobotocore", "gcsfs")):
        where = getattr(error, "filename", None)
        return True, (f"{where}: " if where else "") + storage_problem(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return False, f"unexpected {type(error).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)"


def load(manifest_path: str) -> Manifest:
    from pipeline.manifest import load_manifest

    with user_errors():
        return load_manifest(manifest_path)


# -- options shared by several commands ------------------------------------------------------------------

ManifestArg = Annotated[str, typer.Argument(help="The catalog manifest (YAML), e.g. manifests/catalog.yaml.")]
RootOption = Annotated[
    str | None,
    typer.Option("--root", help="Storage root URI; overrides the manifest's root and $PERFUSION_BATCH_ROOT."),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="Ray dashboard URL (http://head:8265): submit the run as a Ray Job there and follow it. "
        "Default: an embedded local Ray.",
    ),
]


class Device(StrEnum):
    """Where trainings and renderers run (jobs.task_resources)."""

    auto = "auto"
    gpu = "gpu"
    cpu = "cpu"


DeviceOption = Annotated[
    Device | None,
    typer.Option(
        "--device",
        envvar="PERFUSION_BATCH_DEVICE",
        case_sensitive=False,
        help="auto: GPUs when the cluster has some now; gpu: ask for GPUs even before an autoscaling GPU group "
        "has workers; cpu: never. Default auto; with --address, the cluster's own setting unless given.",
    ),
]
PushgatewayOption = Annotated[
    str | None,
    typer.Option("--pushgateway", envvar=PUSHGATEWAY_ENV, help="Push a run summary to this Pushgateway."),
]
IndexRoot = Annotated[
    str | None,
    typer.Option("--root", envvar=ROOT_ENV, help="Storage root URI (default: the manifest's root)."),
]
ManifestOption = Annotated[
    str | None, typer.Option("--manifest", "-m", help="Take the storage root from this manifest.")
]
