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


def test_image_stream_only_steps_leave_the_text_stream_projections_untouched(tmp_path: Path) -> None:
    import pytest
    from safetensors.torch import load_file

    train_dynaip(tmp_path / "start", steps=0, base_weights=None, batch=2)  # the initial weights, saved
    summary = train_dynaip(tmp_path / "image", steps=2, base_weights=None, batch=2, image_stream_only=1.0)
    assert summary["image_stream_only"] == 1.0 and summary["command"].endswith("--image-stream-only 1.0")
    start, trained = (load_file(str(tmp_path / d / ADAPTER_FILE)) for d in ("start", "image"))
    text_keys = [k for k in start if "text_k_ip" in k or "text_v_ip" in k]
    image_keys = [k for k in start if "to_k_ip" in k or "to_v_ip" in k]
    assert text_keys and image_keys
    assert all(start[k].equal(trained[k]) for k in text_keys)  # no step injected into the text stream
    assert any(not start[k].equal(trained[k]) for k in image_keys)
    with pytest.raises(ValueError, match=r"image_stream_only is a fraction of the steps in \[0, 1\], not 1.5"):
        train_dynaip(tmp_path / "bad", steps=1, base_weights=None, batch=2, image_stream_only=1.5)
