"""The `perfusion-batch` command: a thin Typer skin over library calls; errors become messages here."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Annotated

import typer

# transformers warns at import about an image processor we never use (the safety checker's); keep the
# terminal for our own messages. Set TRANSFORMERS_VERBOSITY yourself to see everything.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for concept files, renders and the contact sheet.")] = Path(
        "demo-output"
    ),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps per concept.")] = 60,
    base: Annotated[
        str, typer.Option("--base", help="'toy' (pretrained toy-world model) or 'tiny' (random, seconds).")
    ] = "tiny",
) -> None:
    """Train two concepts, reload them into a fresh pipeline and render single- and two-concept prompts.

    Example: perfusion-batch demo --base toy --out demo-output --steps 150
    """
    if base not in {"toy", "tiny"}:
        typer.secho(f"error: --base must be 'toy' or 'tiny', not {base!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    import perfusion
    from pipeline.demo import run_demo

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def on_step(token: str, info: perfusion.StepInfo) -> None:
            if token not in tasks:
                tasks[token] = progress.add_task(f"training {token}", total=info.steps, loss="-")
            progress.update(tasks[token], completed=info.step, loss=f"{info.loss:.4f}")

        try:
            run_demo(out, steps=steps, base_name=base, log=progress.console.print, on_step=on_step)
        except perfusion.PerfusionError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1) from error
