"""`python -m pipeline ...` is the same as `perfusion-batch ...` (works before the script is on PATH)."""

from pipeline.cli import app

app()
