"""The `perfusion-batch` command: a thin Typer skin over library calls; errors become messages here."""

from __future__ import annotations

import importlib.metadata
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.metrics import PUSHGATEWAY_ENV
from pipeline.store import ROOT_ENV

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


# -- catalogs: validate, train, concepts ---------------------------------------------------------------------

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


def _device_flag(device: Device | None) -> list[str]:
    """--device for a submitted run only when given here: otherwise the cluster's PERFUSION_BATCH_DEVICE
    (e.g. `gpu` on an autoscaling KubeRay cluster, deploy/kuberay/config.yaml) decides there."""
    return ["--device", device.value] if device else []


def _remote(address: str | None) -> str | None:
    """The cluster to submit this run to as a Ray Job, if any. None inside a Ray Job: its driver is on the
    cluster already (RAY_API_SERVER_ADDRESS set in a pod's environment must not make it submit itself again)."""
    from pipeline import jobs

    return None if not address or jobs.inside_ray_job() else address


def _push(gateway: str | None, command: str, catalog: str, summary, unit: str, schedule: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Push a run's summary (job=perfusion-batch-COMMAND) when a Pushgateway is configured; a push that fails
    is a warning, never the run's failure."""
    from pipeline.metrics import push_summary

    if not gateway:
        return
    try:
        job = f"perfusion-batch-{command}"
        push_summary(gateway, job, catalog, summary.counts(), summary.seconds, summary.ok, unit=unit, schedule=schedule)
    except OSError as error:
        typer.secho(f"warning: could not push the summary to the Pushgateway: {error}", fg="yellow", err=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=code)


def _load(manifest_path: str):  # type: ignore[no-untyped-def]
    from pipeline.manifest import ManifestError, load_manifest

    try:
        return load_manifest(manifest_path)
    except ManifestError as error:
        raise _fail(str(error)) from None


@app.command()
def validate(manifest: ManifestArg, root: RootOption = None) -> None:
    """Check a manifest: the schema, every image (exists and decodes), tokens; print the plan.

    Nothing is trained. Exit code 0 if every concept can train, 1 if some concept's files have problems,
    2 if the manifest itself is invalid.

    Example: perfusion-batch validate manifests/catalog.yaml
    """
    from pipeline import tasks
    from pipeline.manifest import ManifestError
    from pipeline.train import TrainOptions, TrainRun

    spec = _load(manifest)
    try:
        run = TrainRun(spec, TrainOptions(root=root))
        base = tasks.prepare_base(run.base_model, run.store.root, write=False)  # planning writes nothing
        plan, done = run.plan(base)
    except ManifestError as error:
        raise _fail(str(error)) from None
    except Exception as error:
        raise _fail(f"{type(error).__name__}: {error}") from None
    typer.echo(f"{spec.catalog}: {len(plan)} concept(s), base {spec.base_model}, root {run.store.root}")
    problems = 0
    for item in plan:
        if not item.ready:
            problems += 1
            typer.secho(f"  {item.name}: cannot train:", fg=typer.colors.RED)
            for problem in item.problems:
                typer.echo(f"      {problem}")
        else:
            state = "already trained (skipped)" if item.concept_key in done else "would train"
            typer.echo(f"  {item.name} {item.spec.concept_token}: {len(item.images)} image(s), {state}")
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
    spec = _load(manifest)
    if cluster := _remote(address):
        argv = ["--concurrency", str(concurrency)] if concurrency else []
        argv += ["--gpus-per-task", str(gpus_per_task), *_device_flag(device)]
        argv += ["--dry-run"] if dry_run else []
        argv += ["--force"] if force else []
        argv += [a for name in only or [] for a in ("--only", name)]
        argv += ["--pushgateway", pushgateway] if pushgateway else []
        _submit(spec, manifest, cluster, "train", argv, root)
        return
    from pipeline.manifest import ManifestError
    from pipeline.progress import make_display
    from pipeline.store import StoreError
    from pipeline.train import TrainOptions, TrainRun

    options = TrainOptions(
        root=root,
        force=force,
        only=tuple(only or ()),
        dry_run=dry_run,
        max_concurrency=concurrency,
        gpus_per_task=gpus_per_task,
        device=(device or Device.auto).value,
    )
    try:
        run = TrainRun(spec, options)
        summary = run.execute(make_display())
    except (ManifestError, StoreError) as error:
        raise _fail(str(error)) from None
    if not dry_run:
        _push(pushgateway, "train", spec.catalog, summary, "concepts")
    if not summary.ok:
        raise typer.Exit(code=1)


def _submit(spec, manifest: str, address: str, command: str, argv: list[str], root: str | None) -> None:  # type: ignore[no-untyped-def]
    """Run `perfusion-batch COMMAND MANIFEST ARGV...` as a Ray Job on the cluster at `address`; exit with the
    job's status. The manifest's folder travels as the job's working_dir (images beside it come along)."""
    import shlex

    from pipeline import jobs

    folder = os.path.dirname(os.path.abspath(manifest)) if "://" not in manifest else None
    target = os.path.basename(manifest) if folder else manifest
    argv = [target, *(["--root", root] if root else []), *argv]
    root_uri = spec.storage_root(root)
    if "://" not in root_uri or root_uri.startswith("file://"):
        typer.secho(
            f"warning: storage root {root_uri!r} is a local path: on a cluster it is the job's working folder, "
            "which is discarded; pass --root s3://... (or gs://) to keep the results",
            fg="yellow",
            err=True,
        )
    runtime_env: dict[str, object] = {"working_dir": folder} if folder else {}
    env_vars = {k: os.environ[k] for k in (ROOT_ENV,) if os.environ.get(k)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    text = Path(manifest).read_text(encoding="utf-8") if folder else manifest
    job_id = jobs.submission_id(command, spec.catalog, text, argv)
    outcome = jobs.submit_and_follow(
        address,
        entrypoint=f"perfusion-batch {command} " + " ".join(shlex.quote(a) for a in argv),
        base_id=job_id,
        metadata={"catalog": spec.catalog, "manifest": os.path.basename(manifest), "command": command},
        runtime_env=runtime_env,
    )
    typer.echo(f"Ray job {job_id}: {outcome.status}")
    if outcome.status != "SUCCEEDED":
        # The entrypoint's own code (1: some items failed; 2: bad input, nothing ran), else 1 (stopped, lost).
        raise typer.Exit(code=outcome.exit_code if outcome.exit_code in (1, 2) else 1)


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
    spec = _load(manifest)
    if cluster := _remote(address):
        argv = [a for name in job or [] for a in ("--job", name)]
        argv += ["--dry-run"] if dry_run else []
        argv += ["--limit", str(limit)] if limit else []
        argv += ["--batch-size", str(batch_size), "--gpus-per-actor", str(gpus_per_actor), *_device_flag(device)]
        argv += ["--actors", str(actors)] if actors else []
        argv += ["--pushgateway", pushgateway] if pushgateway else []
        argv += ["--schedule", schedule] if schedule else []
        _submit(spec, manifest, cluster, "render", argv, root)
        return
    from pipeline.manifest import ManifestError
    from pipeline.progress import render_progress
    from pipeline.render import RenderOptions, RenderRun
    from pipeline.render_plan import RenderPlanError
    from pipeline.store import StoreError

    options = RenderOptions(
        root=root,
        jobs=tuple(job or ()),
        dry_run=dry_run,
        limit=limit,
        batch_size=batch_size,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        device=(device or Device.auto).value,
    )
    try:
        run = RenderRun(spec, options)
        with render_progress() as progress:
            summary = run.execute(progress, message=typer.echo)
    except (ManifestError, StoreError, RenderPlanError) as error:
        raise _fail(str(error)) from None
    for failure in summary.errors[:20]:
        typer.secho(f"  failed: {failure}", fg=typer.colors.RED, err=True)
    for name, sheet in summary.sheets.items():
        typer.echo(f"  {name}: contact sheet {sheet}, page {summary.pages[name]}")
    typer.echo(summary.line())
    if not dry_run:
        _push(pushgateway, "render", spec.catalog, summary, "images", schedule=schedule)
    if not summary.ok:
        raise typer.Exit(code=1)


@app.command()
def doctor(
    manifest: Annotated[
        str | None, typer.Option("--manifest", "-m", help="Check this manifest's storage root and base model.")
    ] = None,
    root: RootOption = None,
    address: AddressOption = None,
    base: Annotated[str | None, typer.Option("--base", help="Check this base model (default: the manifest's).")] = None,
    device: DeviceOption = None,
    pushgateway: PushgatewayOption = None,
) -> None:
    """Check what a run here would get: versions, the Ray cluster, GPUs, storage, base model, Pushgateway.

    One line per check: ok, warn (it runs, maybe not as intended) or FAIL (a run would fail); exit code 1
    when any check fails. Reads the same flags and environment variables as train and render, and never
    prints a secret.

    Example: perfusion-batch doctor -m manifests/catalog.yaml --address http://head:8265
    """
    from pipeline.doctor import FAIL, run_checks

    spec = _load(manifest) if manifest else None
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


concepts_app = typer.Typer(
    help="Query the concept index: list, show, SQL. Example: perfusion-batch concepts list -m manifests/catalog.yaml",
    no_args_is_help=True,
)
app.add_typer(concepts_app, name="concepts")
FormatOption = Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")]
IndexRoot = Annotated[
    str | None,
    typer.Option("--root", envvar=ROOT_ENV, help="Storage root URI (default: the manifest's root)."),
]
ManifestOption = Annotated[
    str | None, typer.Option("--manifest", "-m", help="Take the storage root from this manifest.")
]


def _index(root: str | None, manifest: str | None):  # type: ignore[no-untyped-def]
    from pipeline.index import ConceptIndex
    from pipeline.store import Store, StoreError

    if root is None and manifest is None:
        raise _fail("give --root URI (or set PERFUSION_BATCH_ROOT) or --manifest FILE")
    if root is None:
        spec = _load(manifest)  # type: ignore[arg-type]
        root = spec.storage_root()
    try:
        return ConceptIndex(Store(root))
    except StoreError as error:
        raise _fail(str(error)) from None


def _emit(rows: list[dict[str, object]], columns: list[str], fmt: str) -> None:
    import csv
    import datetime
    import json
    import sys

    if fmt not in {"table", "json", "csv"}:
        raise _fail(f"--format must be table, json or csv, not {fmt!r}")
    rows = [{k: (v.isoformat() if isinstance(v, datetime.datetime) else v) for k, v in r.items()} for r in rows]
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*[_cell(c, row.get(c)) for c in columns])
        Console().print(table)


def _cell(column: str, value: object) -> str:
    """Short forms for the table view (json and csv keep full values)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if column == "created_at":
        return str(value)[:19].replace("T", " ")
    if column in {"file_uri", "image_uri"}:
        return str(value).rsplit("/", 1)[-1][:16] + "..."
    return str(value)


LIST_COLUMNS = ["name", "token", "superclass", "status", "steps", "final_loss", "bytes", "created_at", "file_uri"]


@concepts_app.command("list")
def concepts_list(
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    catalog: Annotated[str | None, typer.Option("--catalog", help="Only this catalog.")] = None,
    superclass: Annotated[str | None, typer.Option("--superclass", help="Only this superclass.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE tag filter (repeatable).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Latest attempt per name, failed ones included.")] = False,
    fmt: FormatOption = "table",
) -> None:
    """The latest successful concept per name (with --failed: the latest attempt, whatever its status).

    Example: perfusion-batch concepts list --root s3://bucket/catalog --tag category=mugs --format csv
    """
    tags = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(f"--tag {item!r}: use KEY=VALUE, e.g. --tag category=mugs")
        tags[key] = value
    from pipeline.index import Status

    index = _index(root, manifest)
    rows = index.latest(
        catalog=catalog, superclass=superclass, tags=tags or None, status=None if failed else Status.SUCCEEDED
    )
    _emit(rows, [*LIST_COLUMNS, "error"] if failed else LIST_COLUMNS, fmt)


@concepts_app.command("show")
def concepts_show(
    name: Annotated[str, typer.Argument(help="Concept name.")],
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the file's sha256.")] = True,
    fmt: FormatOption = "json",
) -> None:
    """Every field of the latest successful concept called NAME; verifies its file's checksum.

    Example: perfusion-batch concepts show dotted-star -m manifests/catalog.yaml
    """
    index = _index(root, manifest)
    row = index.get(name)
    if row is None:
        raise _fail(f"no successful concept named {name!r} in {index.uri} (see `perfusion-batch concepts list`)", 1)
    if verify:
        from pipeline.store import ChecksumError

        try:
            index.store.read(index.store.relative(row["file_uri"]), row["sha256"])
        except ChecksumError as error:
            raise _fail(str(error), 1) from None
        except FileNotFoundError:
            raise _fail(f"{row['file_uri']} is missing from the store", 1) from None
    _emit([row], list(row), fmt)


@concepts_app.command("query")
def concepts_query(
    sql: Annotated[str, typer.Argument(help='SQL over the view `concepts`, e.g. "SELECT name FROM concepts".')],
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    fmt: FormatOption = "table",
) -> None:
    """Run SQL (DuckDB) over the concept index, exposed as the table `concepts`.

    Example: perfusion-batch concepts query "SELECT status, count(*) FROM concepts GROUP BY status" -m catalog.yaml
    """
    _query(_index(root, manifest), sql, fmt)


def _query(index, sql: str, fmt: str) -> None:  # type: ignore[no-untyped-def]
    """SQL (DuckDB) over a Delta index; any query error is a message, exit code 2."""
    try:
        table = index.sql(sql)
    except Exception as error:
        raise _fail(f"query failed: {error}") from None
    _emit(table.to_pylist(), table.column_names, fmt)


renders_app = typer.Typer(
    help="Query the render index: list, SQL. Example: perfusion-batch renders list -m manifests/catalog.yaml",
    no_args_is_help=True,
)
app.add_typer(renders_app, name="renders")
RENDER_COLUMNS = ["job", "prompt", "concept_names", "seed", "status", "seconds", "created_at", "image_uri"]


def _render_index(root: str | None, manifest: str | None):  # type: ignore[no-untyped-def]
    from pipeline.index import RenderIndex

    return RenderIndex(_index(root, manifest).store)


@renders_app.command("list")
def renders_list(
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    job: Annotated[str | None, typer.Option("--job", help="Only this job.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Failed attempts instead of rendered images.")] = False,
    fmt: FormatOption = "table",
) -> None:
    """Rendered images (one row each), or with --failed the failed attempts with their errors.

    Example: perfusion-batch renders list -m manifests/catalog.yaml --job new-scenes --format csv
    """
    import pyarrow.compute as pc

    from pipeline.index import Status

    index = _render_index(root, manifest)
    condition = pc.field("status") == (Status.FAILED if failed else Status.SUCCEEDED)
    if job:
        condition = condition & (pc.field("job") == job)
    rows = sorted(index.rows(filter=condition).to_pylist(), key=lambda r: (r["job"], r["prompt"], r["seed"]))
    _emit(rows, [*RENDER_COLUMNS, "error"] if failed else RENDER_COLUMNS, fmt)


@renders_app.command("query")
def renders_query(
    sql: Annotated[str, typer.Argument(help='SQL over the view `renders`, e.g. "SELECT job FROM renders".')],
    root: IndexRoot = None,
    manifest: ManifestOption = None,
    fmt: FormatOption = "table",
) -> None:
    """Run SQL (DuckDB) over the render index, exposed as the table `renders`.

    Example: perfusion-batch renders query "SELECT job, count(*) FROM renders GROUP BY job" -m catalog.yaml
    """
    _query(_render_index(root, manifest), sql, fmt)
