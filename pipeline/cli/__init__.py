"""The `perfusion-batch` command: a thin Typer skin over library calls, one module per concern.

app.py      the Typer app, the options every command shares, and the one place errors become messages
runs.py     validate, train, render, doctor: a manifest's runs, here or submitted (submit.py) to a cluster
submit.py   a run as a Ray Job: its argv rebuilt from the same options object the local run takes
query.py    `concepts` and `renders`: the index, listed, shown and queried with SQL
demo.py     the two-concept demo and its progress bars
"""

from pipeline.cli import demo, query, runs  # noqa: F401  (each registers its commands on the app)
from pipeline.cli.app import app

__all__ = ["app"]
