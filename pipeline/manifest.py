"""The catalog manifest: a versioned YAML schema, validated all at once, with paths to every problem.

    version: 1
    catalog: demo-catalog                 # names the catalog in the index
    root: ./store                         # storage root URI (local folder, file://, s3://, gs://)
    base_model: toy                       # toy | tiny | a local diffusers folder | a .safetensors checkpoint
    training: {steps: 150}                # defaults for every concept (perfusion.TrainConfig fields)
    concepts:
      - name: dotted-star                 # names files in the store: lower-case letters, digits, . _ -
        token: <dotted-star>              # optional; derived from the name
        superclass: star
        images: [images/dotted-star/*.png]  # URIs or globs, relative to the manifest's folder
        masks: [masks/dotted-star/*.png]  # optional; one mask per image after expansion, same order
        training: {steps: 300}            # optional per-concept overrides of the defaults
        tags: {sku: A-1001, category: toys}

`load_manifest` parses and checks the schema and the cross-field rules (duplicate names and tokens, token
syntax) and raises ManifestError listing every problem with its path, e.g.
`concepts[3].superclass: field required`. Checks that need I/O (images exist and decode, masks pair with
images, tokens that collide with the base model's vocabulary) live in pipeline/plan.py so that parsing stays instant.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_VERSION = 1
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# perfusion.tokens.TOKEN_PATTERN, repeated here so that parsing a manifest does not import torch.
TOKEN_PATTERN = re.compile(r"^<?[a-z0-9][a-z0-9_.-]*>?$")
NAME_RULE = "1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Problem:
    path: str  # where in the document: "concepts[3].superclass"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ManifestError(Exception):
    """Every problem found in a manifest at once; nothing has run."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the manifest:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingSettings(_Strict):
    """Overrides of perfusion.TrainConfig; a field left out keeps the catalog default, then the library's."""

    steps: int | None = Field(None, ge=1, le=100_000)
    batch_size: int | None = Field(None, ge=1)
    grad_accumulation: int | None = Field(None, ge=1)
    lr_value: float | None = Field(None, gt=0)
    lr_embedding: float | None = Field(None, gt=0)
    train_beta: float | None = None
    train_tau: float | None = Field(None, gt=0)
    inference_beta: float | None = None
    inference_tau: float | None = Field(None, gt=0)
    resolution: int | None = Field(None, ge=8)
    flip_probability: float | None = Field(None, ge=0, le=1)
    select_every: int | None = Field(None, ge=1)
    lock_keys: bool | None = None
    method: Literal["perfusion", "textual_inversion"] | None = None
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] | None = None
    seed: int | None = None

    def values(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


Tag = str | int | float | bool


class ConceptSpec(_Strict):
    name: str
    superclass: str = Field(min_length=1)
    images: list[str] = Field(min_length=1)
    token: str | None = None
    masks: list[str] | None = None
    training: TrainingSettings = TrainingSettings()
    tags: dict[str, Tag] = {}

    @property
    def concept_token(self) -> str:
        return self.token if self.token is not None else f"<{self.name}>"


class Manifest(_Strict):
    version: Literal[1]
    catalog: str
    root: str = "./store"
    base_model: str = "toy"
    training: TrainingSettings = TrainingSettings()
    concepts: list[ConceptSpec] = Field(min_length=1)
    # Where the manifest was read from: relative image paths and a relative root resolve against its folder.
    source: str = Field("", exclude=True)

    def training_config(self, concept: ConceptSpec) -> dict[str, Any]:
        """Catalog defaults, then the concept's overrides (the fields given; the rest are the library's)."""
        return self.training.values() | concept.training.values()

    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.source) if self.source else "."

    def resolve(self, uri: str) -> str:
        """A manifest-relative path -> a path or URI that means the same from any working directory."""
        if "://" in uri or os.path.isabs(uri):
            return uri
        return str(Path(self.base_dir, uri))

    def concept(self, name: str) -> ConceptSpec:
        for spec in self.concepts:
            if spec.name == name:
                return spec
        raise KeyError(name)


def load_manifest(path: str | os.PathLike[str], text: str | None = None) -> Manifest:
    """Read, parse and validate a manifest; raises ManifestError with every problem found."""
    source = os.fspath(path)
    if text is None:
        try:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            raise ManifestError(source, [Problem("", "file not found: check the path")]) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ManifestError(source, [Problem("", f"cannot read the file ({error})")]) from None
    return parse_manifest(text, source)


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(source, [Problem("", f"not valid YAML: {where}{problem}")]) from None
    if not isinstance(document, dict):
        raise ManifestError(source, [Problem("", "expected a mapping with version, catalog and concepts")])
    try:
        manifest = Manifest.model_validate(document | {"source": source})
    except ValidationError as error:
        raise ManifestError(source, [_problem(e) for e in error.errors()]) from None
    problems = semantic_problems(manifest)
    if problems:
        raise ManifestError(source, problems)
    return manifest


def semantic_problems(manifest: Manifest) -> list[Problem]:
    """Rules across fields: names safe as file names and unique, tokens well-formed and unique, masks paired."""
    problems: list[Problem] = []
    if not NAME_PATTERN.match(manifest.catalog):
        problems.append(Problem("catalog", f"{manifest.catalog!r} is not a valid catalog name: use {NAME_RULE}"))
    first_by_name: dict[str, int] = {}
    first_by_token: dict[str, int] = {}
    for index, spec in enumerate(manifest.concepts):
        at = f"concepts[{index}]"
        if not NAME_PATTERN.match(spec.name):
            problems.append(
                Problem(
                    f"{at}.name",
                    f"{spec.name!r} is not a valid concept name (it names files in the store): use {NAME_RULE}",
                )
            )
        elif spec.name in first_by_name:
            problems.append(
                Problem(f"{at}.name", f"duplicate name {spec.name!r} (also concepts[{first_by_name[spec.name]}])")
            )
        else:
            first_by_name[spec.name] = index
        token = spec.concept_token
        if not TOKEN_PATTERN.match(token):
            problems.append(
                Problem(
                    f"{at}.token",
                    f"{token!r} is not a valid concept token: use lower-case letters, digits, '-', '_' or '.', "
                    "optionally in angle brackets, e.g. '<sku-123>'",
                )
            )
        elif token in first_by_token:
            problems.append(
                Problem(f"{at}.token", f"duplicate token {token!r} (also concepts[{first_by_token[token]}])")
            )
        else:
            first_by_token[token] = index
        if not spec.superclass.strip():
            problems.append(Problem(f"{at}.superclass", "must name the concept's class, e.g. 'mug'"))
        for position, image in enumerate(spec.images):
            if not image.strip():
                problems.append(Problem(f"{at}.images[{position}]", "empty path"))
        merged = manifest.training_config(spec)
        if "batch_size" in merged and merged["batch_size"] % merged.get("grad_accumulation", 1):
            problems.append(Problem(f"{at}.training.batch_size", "must be a multiple of grad_accumulation"))
    return problems


def _problem(error: Any) -> Problem:
    """A pydantic error -> Problem('concepts[3].superclass', 'field required')."""
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = str(error["msg"])
    message = message[0].lower() + message[1:] if message else message
    if error["type"] == "extra_forbidden":
        message = "unknown field (check its spelling against the manifest reference in README.md)"
    elif error["type"] == "literal_error" and path == "version":
        message = f"unsupported manifest version {error.get('input')!r}: this release reads version {MANIFEST_VERSION}"
    return Problem(path, message)
