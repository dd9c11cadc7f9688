"""validate, train, render, doctor: a manifest's runs, here on an embedded Ray or submitted to a cluster."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from pipeline.cli.app import (
    AddressOption,
    Device,
    DeviceOption,
    ManifestArg,
    PushgatewayOption,
    RootOption,
    app,
    load,
    terminate_as_interrupt,
    user_errors,
)
from pipeline.cli.submit import cluster_to_submit_to, submit
from pipeline.metrics import PUSHGATEWAY_ENV
from pipeline.store import ROOT_ENV


@app.command()
def validate(manifest: ManifestArg, root: RootOption = None) -> None:
    """Check a manifest: the schema, every image (exists and decodes), tokens; print the plan.

    Nothing is trained and nothing is written: the same plan as `train --dry-run`, without Ray. Exit code 0
    if every concept can train, 1 if some concept's files have problems, 2 if the manifest itself is invalid.

    Example: perfusion-batch validate manifests/catalog.yaml
    """
    from pipeline.index import Status
    from pipeline.render_plan import capped_prompts, planned_images
    from pipeline.train import TrainOptions, TrainRun

    spec = load(manifest)
    with user_errors():
        run = TrainRun(spec, TrainOptions(root=root))
        plan = run.local_plan()
    typer.echo(f"{spec.catalog}: {len(plan)} concept(s), base {spec.base_model}, root {run.store.root}")
    problems = 0
    for item, status in plan:
        if status == Status.FAILED:
            problems += 1
            typer.secho(f"  {item.name}: cannot train:", fg=typer.colors.RED)
            for problem in item.problems:
                typer.echo(f"      {problem}")
        else:
            verb = ("onboarded", "onboard") if spec.is_zero_shot(item.spec) else ("trained", "train")
            state = f"already {verb[0]} (skipped)" if status == Status.SKIPPED else f"would {verb[1]}"
            typer.echo(f"  {item.name} {item.spec.concept_token}: {len(item.images)} image(s), {state}")
        for note in item.notes:
            typer.secho(f"      note: {note}", fg=typer.colors.YELLOW)
    for job in spec.renders:
        typer.echo(f"  render job {job.name}: {planned_images(spec, job):,} image(s) planned")
    for line in capped_prompts(spec, spec.renders):
        typer.echo(f"      capped: {line}")
    if problems:
        raise typer.Exit(code=1)


@app.command()
def train(
    manifest: ManifestArg,
    root: RootOption = None,
    address: AddressOption = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Most trainings at once (default: what fits).")
    ] = None,
    gpus_per_task: Annotated[
        float, typer.Option("--gpus-per-task", min=0.01, help="GPUs per training on GPU clusters (0.5 = two per GPU).")
    ] = 1.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and print; train nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain concepts that already succeeded.")] = False,
    only: Annotated[list[str] | None, typer.Option("--only", help="Train only this concept (repeatable).")] = None,
    device: DeviceOption = None,
    pushgateway: PushgatewayOption = None,
) -> None:
    """Train every concept of the catalog that is not trained yet, one Ray task per concept.

    Exit code 0 when every concept is trained, 1 when some failed (each recorded in the index with its
    error; the others are kept), 2 for an invalid manifest or flag (nothing ran).

    Example: perfusion-batch train manifests/catalog.yaml --root s3://bucket/catalogs/demo
    """
    from pipeline.progress import make_display
    from pipeline.train import TrainOptions, TrainRun

    spec = load(manifest)
    options = TrainOptions(
        root=root,
        force=force,
        only=tuple(only or ()),
        dry_run=dry_run,
        max_concurrency=concurrency,
        gpus_per_task=gpus_per_task,
        device=device.value if device else None,
        pushgateway=pushgateway,
    )
    if cluster := cluster_to_submit_to(address):
        submit(spec, manifest, cluster, "train", options)
        return
    with user_errors(), terminate_as_interrupt():
        summary = TrainRun(spec, options).execute(make_display())
    finish(summary, options, "train", "concepts")


@app.command()
def render(
    manifest: ManifestArg,
    root: RootOption = None,
    address: AddressOption = None,
    job: Annotated[list[str] | None, typer.Option("--job", help="Render only this job (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and print; render nothing.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Render at most N new images.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    actors: Annotated[
        int | None, typer.Option("--actors", min=1, help="Renderer actors (default: one per GPU, else per CPU).")
    ] = None,
    gpus_per_actor: Annotated[
        float, typer.Option("--gpus-per-actor", min=0.01, help="GPUs per renderer on GPU clusters.")
    ] = 1.0,
    device: DeviceOption = None,
    pushgateway: PushgatewayOption = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule",
            envvar="PERFUSION_BATCH_SCHEDULE",
            help="Name of the schedule this run belongs to (e.g. nightly): its Pushgateway summary carries "
            "schedule=NAME, which the alert rules watch; ad-hoc runs leave it out.",
        ),
    ] = None,
) -> None:
    """Render the manifest's render jobs (prompts x concept combinations x seeds) with Ray Data.

    Only images not rendered yet are rendered, so a scheduler can run this as often as it likes. Writes
    {root}/renders/<render_id>.png, a row per image in {root}/index/renders, and a contact sheet and HTML
    page per job under {root}/renders/sheets/. Exit code 0 when every image rendered, 1 when some failed
    (recorded with their errors), 2 for an invalid manifest, flag, or a concept not trained (nothing ran).

    Example: perfusion-batch render manifests/catalog.yaml --job new-scenes
    """
    from pipeline.progress import render_progress
    from pipeline.render import RenderOptions, RenderRun

    spec = load(manifest)
    options = RenderOptions(
        root=root,
        jobs=tuple(job or ()),
        dry_run=dry_run,
        limit=limit,
        batch_size=batch_size,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        device=device.value if device else None,
        pushgateway=pushgateway,
        schedule=schedule,
    )
    if cluster := cluster_to_submit_to(address):
        submit(spec, manifest, cluster, "render", options)
        return
    with user_errors():
        run = RenderRun(spec, options)
        with render_progress() as progress:
            summary = run.execute(progress, message=typer.echo)
    for failure in summary.errors[:20]:
        typer.secho(f"  failed: {failure}", fg=typer.colors.RED, err=True)
    for name, sheet in summary.sheets.items():
        typer.echo(f"  {name}: contact sheet {sheet}, page {summary.pages[name]}")
    typer.echo(summary.line())
    finish(summary, options, "render", "images")


@app.command()
def doctor(
    manifest: Annotated[
        str | None, typer.Option("--manifest", "-m", help="Check this manifest's storage root and base model.")
    ] = None,
    root: RootOption = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            envvar="RAY_API_SERVER_ADDRESS",
            help="Check this Ray cluster (its dashboard URL, http://head:8265). Default: an embedded local Ray.",
        ),
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Check this base model (default: the manifest's).")] = None,
    device: DeviceOption = None,
    pushgateway: Annotated[
        str | None,
        typer.Option("--pushgateway", envvar=PUSHGATEWAY_ENV, help="Check that this Pushgateway accepts pushes."),
    ] = None,
) -> None:
    """Check what a run here would get: versions, the Ray cluster, GPUs, storage, base model, Pushgateway.

    One line per check: ok, warn (it runs, maybe not as intended) or FAIL (a run would fail); exit code 1
    when any check fails. Reads the same flags and environment variables as train and render, and never
    prints a secret.

    Example: perfusion-batch doctor -m manifests/catalog.yaml --address http://head:8265
    """
    from pipeline.doctor import FAIL, run_checks

    spec = load(manifest) if manifest else None
    root_uri = spec.storage_root(root) if spec else root or os.environ.get(ROOT_ENV)
    base_model = base or (spec.base_model_path() if spec else None)
    checks = run_checks(address, root_uri, base_model, pushgateway, (device or Device.auto).value)
    for check in checks:
        color = {FAIL: typer.colors.RED, "warn": typer.colors.YELLOW}.get(check.verdict, typer.colors.GREEN)
        typer.secho(check.line(), fg=color)
    failed = [c.name for c in checks if c.verdict == FAIL]
    typer.echo(f"verdict: {'not ready (' + ', '.join(failed) + ')' if failed else 'ready'}")
    if failed:
        raise typer.Exit(code=1)


def finish(summary: Any, options: Any, command: str, unit: str) -> None:
    """A run's end: its summary pushed (job=perfusion-batch-COMMAND) when a Pushgateway is configured and it
    was not a dry run (a push that fails is a warning, never the run's failure); exit 1 if anything failed."""
    from pipeline.metrics import push_summary

    if options.pushgateway and not options.dry_run:
        job, schedule = f"perfusion-batch-{command}", getattr(options, "schedule", None)
        try:
            push_summary(
                options.pushgateway,
                job,
                summary.catalog,
                summary.counts(),
                summary.seconds,
                summary.ok,
                unit=unit,
                schedule=schedule,
            )
        except OSError as error:
            typer.secho(f"warning: could not push the summary to the Pushgateway: {error}", fg="yellow", err=True)
    if not summary.ok:
        raise typer.Exit(code=1)
