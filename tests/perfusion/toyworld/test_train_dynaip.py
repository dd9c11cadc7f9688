"""The toy DynaIP adapter's training run: it writes an adapter file bound to its base, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

from perfusion.dynaip import DynaIPAdapter
from perfusion.models import fingerprint
from perfusion.toyworld.mmdit_model import build_toy_mmdit_pipeline
from perfusion.toyworld.train_dynaip import ADAPTER_FILE, train_dynaip


def test_a_short_run_writes_an_adapter_for_its_base_and_resumes(tmp_path: Path) -> None:
    summary = train_dynaip(tmp_path, steps=2, base_weights=None, batch=2)
    assert summary["steps"] == 2 and summary["levels"] == [1, 2, 4]
    assert json.loads((tmp_path / "train_dynaip.json").read_text())["steps"] == 2
    base = build_toy_mmdit_pipeline(weights=None)
    adapter = DynaIPAdapter.load(str(tmp_path / ADAPTER_FILE), base.transformer, 128, fingerprint(base))
    assert adapter.levels == (1, 2, 4)
    resumed = train_dynaip(tmp_path, steps=3, base_weights=None, batch=2, resume=True)
    assert resumed["steps"] == 3
