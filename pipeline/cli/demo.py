"""`perfusion-batch demo`: two concepts trained, reloaded and rendered, with a progress bar per training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import app, fail, user_errors


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
        raise fail(f"--base must be 'toy' or 'tiny', not {base!r}")
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

        with user_errors(code=1):
            run_demo(out, steps=steps, base_name=base, log=progress.console.print, on_step=on_step)
