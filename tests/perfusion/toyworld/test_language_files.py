"""The toy base's language ships as files beside its weights: they hold what the world generates."""

from __future__ import annotations

from perfusion.toyworld.model import language_files


def test_the_shipped_language_files_hold_a_fresh_generation():
    for path, text in language_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `python -m perfusion.toyworld.model`"
