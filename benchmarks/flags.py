"""A benchmark's flags from its config dataclass: one flag per field (--batch-size for batch_size), its
default the field's, its help the field's metadata["help"]."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field
from typing import Any, TypeVar

Config = TypeVar("Config")


def option(default: Any, help: str = "") -> Any:
    """A config field that is also a flag."""
    return field(default=default, metadata={"help": help})


def parse_flags(config_type: type[Config], description: str, argv: list[str] | None = None) -> Config:
    """The config the command line asks for; config.problems() (a list of messages, if it has one) become
    argparse errors, before anything loads."""
    parser = argparse.ArgumentParser(description=description)
    specs = dataclasses.fields(config_type)  # type: ignore[arg-type]
    for spec in specs:
        flag, help_text = f"--{spec.name.replace('_', '-')}", spec.metadata.get("help", "").replace("%", "%%")
        if isinstance(spec.default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = type(spec.default) if spec.default is not None else str
            parser.add_argument(flag, type=kind, default=spec.default, help=help_text)
    args = parser.parse_args(argv)
    config = config_type(**{spec.name: getattr(args, spec.name) for spec in specs})
    for problem in getattr(config, "problems", list)():
        parser.error(problem)
    return config
