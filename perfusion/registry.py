"""The built-in base models by name, in one place: plain Python, so a driver can check a manifest's base_model
without importing torch (perfusion/models.py loads them)."""

from __future__ import annotations

import importlib
from typing import Any

# "module:function" returning a models.BuiltinBase. Imported on first use, so the core never imports a
# built-in's code (the toy world lives in perfusion/toyworld/ and depends on the core, not back).
BUILTIN_BASES: dict[str, str] = {
    "tiny": "perfusion.models:build_tiny_base",
    "toy": "perfusion.toyworld.model:build_toy_base",
    "tiny-mmdit": "perfusion.mmdit:build_tiny_mmdit_base",
    "toy-mmdit": "perfusion.toyworld.mmdit_model:build_toy_mmdit_base",
}


def resolve(target: str) -> Any:
    """The object a "module:function" string names, imported now (built-in bases, methods' code)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
