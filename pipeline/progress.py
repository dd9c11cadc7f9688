"""How a training run shows itself: a live table in a terminal, plain log lines elsewhere (CI, a Ray Job's log,
a pipe), chosen by `make_display()`."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline.index import Status
from pipeline.jobs import inside_ray_job
from pipeline.train import ConceptState, Display, RunSummary

STATUS_STYLE = {
    Status.SUCCEEDED: "green",
    Status.FAILED: "red",
    Status.RUNNING: "cyan",
    Status.SKIPPED: "dim",
    Status.PLANNED: "yellow",
}


def _live(console: Console) -> bool:
    """Redraw in place only on a terminal and outside a Ray Job (whose log is a file: plain lines there)."""
    return console.is_terminal and not inside_ray_job()


def make_display(console: Console | None = None) -> Display:
    console = console or Console(stderr=False)
    if _live(console):
        return LiveDisplay(console)
    return LogDisplay(print_line=lambda text: print(text, file=sys.stdout, flush=True))


class LiveDisplay(Display):
    """A table that redraws in place: concept, state, steps, loss, elapsed."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.summary: RunSummary | None = None
        self.live: Live | None = None
        self.started = time.time()

    def start(self, summary: RunSummary) -> None:
        self.summary, self.started = summary, time.time()
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, state: ConceptState) -> None:
        if self.live is not None:
            self.live.update(self._table())

    def message(self, text: str) -> None:
        self.console.print(text)

    def finish(self, summary: RunSummary) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
        self.console.print(summary_line(summary))

    def _table(self) -> Group:
        """An overall line (done of total, failed, ETA) over a table that fits the terminal: running and
        failed concepts first, then waiting ones, finished ones last; what does not fit is counted."""
        summary = self.summary
        states = list(summary.concepts.values()) if summary else []
        table = Table(title=f"catalog {summary.catalog}" if summary else None, expand=False)
        for column in ("concept", "state", "steps", "loss", "elapsed", "error"):
            table.add_column(column, overflow="fold", max_width=60 if column == "error" else None)
        ordered = sorted(states, key=lambda state: ORDER.get(state.status, len(ORDER)))
        room = max(3, self.console.size.height - 8)  # title, header, borders, the overall line, the summary
        shown, hidden = ordered[:room], ordered[room:]
        for state in shown:
            style = STATUS_STYLE.get(state.status, "")
            table.add_row(
                state.name,
                f"[{style}]{state.status}[/{style}]" if style else state.status,
                f"{state.step}/{state.steps}" if state.steps else "",
                f"{state.loss:.4f}" if state.loss is not None else "",
                _elapsed(state),
                state.error or "",
            )
        if hidden:
            counts = ", ".join(f"{n} {s}" for s, n in Counter(state.status for state in hidden).items())
            table.add_row(f"... {len(hidden)} more", f"[dim]{counts}[/dim]", "", "", "", "")
        return Group(Text(overall_line(states, self.started)), table)


ORDER = {Status.RUNNING: 0, Status.FAILED: 1, Status.PLANNED: 2, Status.SUCCEEDED: 3, Status.SKIPPED: 4}


def overall_line(states: list[ConceptState], started: float) -> str:
    """'12/300 done (1 failed), 4 running; elapsed 3m10s, ETA 1h02m' over the concepts this run trains."""
    work = [s for s in states if s.status != Status.SKIPPED]
    finished = [s for s in work if s.status in (Status.SUCCEEDED, Status.FAILED)]
    running = sum(s.status == Status.RUNNING for s in work)
    failed = sum(s.status == Status.FAILED for s in work)
    elapsed = time.time() - started
    trained = [s for s in finished if s.seconds and not s.adopted]  # failed-in-planning rows took no time
    eta = ""
    if trained and len(finished) < len(work):
        eta = f", ETA {_duration(elapsed / len(trained) * (len(work) - len(finished)))}"
    return f"{len(finished)}/{len(work)} done ({failed} failed), {running} running; elapsed {_duration(elapsed)}{eta}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LogDisplay(Display):
    """One line per state change and every quarter of a concept's steps; greppable, no escape codes."""

    def __init__(self, print_line: Callable[[str], None]) -> None:
        self.print_line = print_line
        self.reported: dict[str, int] = {}
        self.summary: RunSummary | None = None
        self.started = time.time()

    def start(self, summary: RunSummary) -> None:
        self.summary, self.started = summary, time.time()
        counts = ", ".join(f"{n} {s}" for s, n in summary.counts().items() if n)
        self.print_line(
            f"catalog {summary.catalog}: {len(summary.concepts)} concept(s) ({counts}), root {summary.root}"
        )
        for state in summary.concepts.values():
            if state.status == Status.FAILED:
                self.print_line(f"  {state.name}: failed before training: {state.error}")

    def update(self, state: ConceptState) -> None:
        if state.status == Status.RUNNING:
            quarter = 4 * state.step // state.steps if state.steps else 0
            if self.reported.get(state.name) == quarter:
                return
            self.reported[state.name] = quarter
            loss = f" loss {state.loss:.4f}" if state.loss is not None else ""
            steps = f" step {state.step}/{state.steps}" if state.steps else " started"
            self.print_line(f"  {state.name}:{steps}{loss}")
        elif state.status == Status.FAILED:
            self.print_line(f"  {state.name}: FAILED: {state.error}{self._overall()}")
        else:
            self.print_line(f"  {state.name}: {state.status} {_elapsed(state)}".rstrip() + self._overall())

    def _overall(self) -> str:
        return f"  [{overall_line(list(self.summary.concepts.values()), self.started)}]" if self.summary else ""

    def message(self, text: str) -> None:
        self.print_line(text)

    def finish(self, summary: RunSummary) -> None:
        self.print_line(summary_line(summary))


def summary_line(summary: RunSummary) -> str:
    counts = summary.counts()
    verb = "would train" if summary.dry_run else "trained"
    adopted = sum(s.adopted for s in summary.concepts.values())
    done = counts[Status.PLANNED] if summary.dry_run else counts[Status.SUCCEEDED] - adopted
    return (
        f"{summary.catalog}: {verb} {done}, "
        + (f"adopted {adopted} (stored by an interrupted run), " if adopted else "")
        + f"skipped {counts['skipped']} (already trained), failed {counts['failed']}"
        f" in {summary.seconds:.1f}s"
    )


def _elapsed(state: ConceptState) -> str:
    if state.seconds is not None:
        return f"{state.seconds:.1f}s"
    if state.started is not None:
        return f"{time.time() - state.started:.0f}s"
    return ""


@contextlib.contextmanager
def render_progress(console: Console | None = None) -> Iterator[Callable[[int, int, int], None]]:
    """A progress callback (done, total, failed) for a render run: a bar in a terminal, else a log line at
    every tenth of the rows."""
    console = console or Console(stderr=False)
    if _live(console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("render", total=None, failed=0)

            def update(done: int, total: int, failed: int) -> None:
                bar.update(task, completed=done, total=total, failed=failed)

            yield update
        return
    reported = [-1]

    def log(done: int, total: int, failed: int) -> None:
        tenth = 10 * done // total if total else 10
        if tenth != reported[0]:
            reported[0] = tenth
            print(f"  rendered {done}/{total} ({failed} failed)", flush=True)

    yield log
