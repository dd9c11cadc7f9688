"""The catalog manifest: a versioned YAML schema, validated all at once, with paths to every problem.

    version: 1
    catalog: demo-catalog                 # names the catalog in the index
    root: ./store                         # storage root URI (local folder, file://, s3://, gs://)
    base_model: toy                       # toy | tiny | a local diffusers folder | a .safetensors checkpoint
    zero_shot: {base_model: toy-mmdit}    # the MM-DiT base (with its DynaIP adapter) of zero-shot products
    training: {steps: 150}                # defaults for every concept (perfusion.TrainConfig fields)
    concepts:
      - name: dotted-star                 # names files in the store: lower-case letters, digits, . _ -
        token: <dotted-star>              # optional; derived from the name
        superclass: star
        images: [images/dotted-star/*.png]  # URIs or globs, relative to the manifest's folder
        masks: [masks/dotted-star/*.png]  # optional; one mask per image after expansion, same order
        training: {steps: 300}            # optional per-concept overrides of the defaults
        # training.method: perfusion (default) | residuals | textual_inversion | zero-shot, a catalog default or
        # per concept; residuals take their paper's recipe (150 steps, batch 4) for the fields not given;
        # zero-shot products are onboarded (no training) on zero_shot.base_model and take no other field
        # training.select: {every: 25, seeds: 1, samples: 8, scorer: toy | "clip:<folder>" | none, gate: true}
        # chooses each concept's step, seed and gate with a scorer (perfusion/selection.py)
        tags: {sku: A-1001, category: toys}
    concepts_from:                        # optional, beside or instead of concepts: a product table
      table: products.parquet             # Parquet, CSV or a Delta table (pipeline/product_table.py)
      columns: {name: slug, images: photos, tags: [sku]}   # the table's column per field
    renders:                              # optional: batch render jobs (perfusion-batch render)
      - name: new-scenes                  # names the job's files and rows
        prompts:                          # {a}, {b}, ... are filled with concept tokens, in order
          - "a photo of {a} on a green background"
          - "a photo of {a} and {b} on a white background"
        concepts: {tags: {category: stars}}   # which concepts fill them: names, tags, or "all" (default)
        combinations: [[dotted-star, striped-square]]  # optional; default every k-combination of the selection
        max_combinations: 50              # cap per prompt (the first ones in name order)
        images_per_prompt: 2              # seeds seed, seed+1, ...
        seed: 0
        steps: 25                         # also: guidance_scale, resolution, scheduler, lock, localized,
                                          # negative_prompt
        gates: {dotted-star: {beta: 0.6}} # per-concept inference-time overrides of the trained beta/tau

`load_manifest` parses and checks the schema and the cross-field rules (duplicate names and tokens, token
syntax) and raises ManifestError listing every problem with its path, e.g.
`concepts[3].superclass: field required`. Checks that need I/O (images exist and decode, masks pair with
images, tokens that collide with the base model's vocabulary) live in pipeline/plan.py so that parsing stays instant.
"""

from __future__ import annotations

import functools
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model

from perfusion.config import (
    SelectConfig,
    TrainConfig,
    field_types,
    scorer_problem,
    settings_problems,
    superclass_problem,
    token_problem,
    with_method_defaults,
)
from perfusion.methods import ZERO_SHOT
from perfusion.registry import BUILTIN_BASES
from pipeline.product_table import ProductRows, ProductTableError, read_concepts
from pipeline.store import ROOT_ENV

MANIFEST_VERSION = 1
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
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
    # inf and nan are not numbers a setting can take (".inf" and ".nan" are valid YAML floats)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Settings(_Strict):
    @functools.cached_property
    def _given(self) -> dict[str, Any]:  # computed once: the model is frozen (pydantic keeps it out of dumps)
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def values(self) -> dict[str, Any]:
        """The fields given (not None), as a new dict (planning asks a concept's settings many times)."""
        return dict(self._given)


# `training.select`: perfusion.SelectConfig's fields (the library owns their bounds), each optional, plus
# `every`, the scoring cadence (TrainConfig.select_every). A concept's block overrides the catalog's per field.
if TYPE_CHECKING:
    SelectSettings = _Settings
else:
    SelectSettings = create_model(
        "SelectSettings",
        __base__=_Settings,
        every=(int | None, Field(None, **field_types()["select_every"][1])),
        **{name: (hint | None, Field(None, **bounds)) for name, (hint, bounds) in field_types(SelectConfig).items()},
    )

# Overrides of perfusion.TrainConfig, one optional field per TrainConfig field with its type and bounds (the
# library owns them: perfusion/config.py); a field left out keeps the catalog default, then the library's.
if TYPE_CHECKING:
    TrainingSettings = _Settings
else:
    TrainingSettings = create_model(
        "TrainingSettings",
        __base__=_Settings,
        select=(SelectSettings | None, None),
        **{name: (hint | None, Field(None, **bounds)) for name, (hint, bounds) in field_types().items()},
    )


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


class ColumnMap(_Strict):
    """The product table's column for each concept field (pipeline/product_table.py); None: the field's name
    for name, superclass and images, no column for the rest."""

    name: str | None = None
    superclass: str | None = None
    images: str | None = None
    masks: str | None = None
    token: str | None = None
    method: str | None = None
    tags: list[str] = []
    training: dict[str, str] = {}  # TrainConfig field -> column: per-product overrides


class ConceptsFrom(_Strict):
    table: str = Field(min_length=1)
    format: Literal["parquet", "csv", "delta"] | None = None
    columns: ColumnMap = ColumnMap()


class GateOverride(_Strict):
    """Inference-time gate of one concept (PERFUSION.md: sigmoid((sim - beta) / tau)); None keeps the trained."""

    beta: float | None = None
    tau: float | None = Field(None, gt=0)


class ConceptSelection(_Strict):
    names: list[str] | None = None  # None: every concept of the catalog
    tags: dict[str, Tag] = {}  # and only those whose tags all match


class RenderJob(_Strict):
    """One render job: prompt templates x concept combinations x seeds, with the sampler's settings."""

    name: str
    prompts: list[str] = Field(min_length=1)
    concepts: ConceptSelection | Literal["all"] = "all"
    combinations: list[list[str]] | None = None
    max_combinations: int = Field(100, ge=1)
    images_per_prompt: int = Field(1, ge=1, le=256)
    seed: int = Field(0, ge=0)
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(5.0, ge=0)
    resolution: int | None = Field(None, ge=8, le=4096)
    scheduler: Literal["default", "ddim", "dpm", "euler", "pndm"] = "default"  # pipeline/renderer.py SCHEDULERS
    lock: Literal["local", "global"] = "local"
    localized: bool = True  # residual concepts: LAG sampling (off: the residual at every image position)
    negative_prompt: str = ""
    gates: dict[str, GateOverride] = {}

    def selection(self) -> ConceptSelection:
        return ConceptSelection() if self.concepts == "all" else self.concepts


class ZeroShotSettings(_Strict):
    """Where zero-shot products (training.method: zero-shot) are onboarded and rendered."""

    base_model: str = "toy-mmdit"  # an MM-DiT base with a DynaIP adapter


class Manifest(_Strict):
    version: Literal[1]
    catalog: str
    root: str = "./store"
    base_model: str = "toy"
    zero_shot: ZeroShotSettings = ZeroShotSettings()
    training: TrainingSettings = TrainingSettings()
    concepts: list[ConceptSpec] = []  # the inline ones, then (after parse_manifest) the product table's rows
    concepts_from: ConceptsFrom | None = None
    renders: list[RenderJob] = []
    # Where the manifest was read from: relative image paths and a relative root resolve against its folder.
    source: str = Field("", exclude=True)
    _table: ProductRows | None = PrivateAttr(None)  # the rows that came from concepts_from (the last ones)

    def concept_path(self, index: int, field: str = "") -> str:
        """Where concepts[index] was given, for problems: "concepts[3].superclass" for an inline concept,
        "products.parquet row 12, column 'category' (superclass)" for a product table's row."""
        inline = len(self.concepts) - (len(self._table.documents) if self._table else 0)
        if self._table is None or index < inline:
            return f"concepts[{index}]" + (f".{field}" if field else "")
        return self._table.where(index - inline, field)

    def training_config(self, concept: ConceptSpec) -> dict[str, Any]:
        """TrainConfig fields: catalog defaults, then the concept's overrides (the fields given; the rest are
        the library's); `select.every` is TrainConfig.select_every. A zero-shot product's is its method alone
        (nothing is trained: the catalog's training defaults are not its, and do not enter its concept key)."""
        if self.is_zero_shot(concept):
            return {"method": ZERO_SHOT}
        merged = with_method_defaults(self.training.values() | concept.training.values())
        merged.pop("select", None)
        every = self.selection_settings(concept).get("every")
        return merged | ({"select_every": every} if every is not None else {})

    def is_zero_shot(self, concept: ConceptSpec) -> bool:
        method = concept.training.values().get("method", self.training.values().get("method"))
        return bool(method == ZERO_SHOT)

    def zero_shot_names(self) -> set[str]:
        return {c.name for c in self.concepts if self.is_zero_shot(c)}

    def selection_settings(self, concept: ConceptSpec) -> dict[str, Any]:
        """The concept's `training.select` fields: the catalog's block, then the concept's, per field."""
        blocks = [self.training.values().get("select"), concept.training.values().get("select")]
        return {k: v for block in blocks if block for k, v in block.items() if v is not None}

    def selection(self, concept: ConceptSpec) -> SelectConfig | None:
        """How the concept's operating point is chosen; None: no selection (no block, or scorer 'none').
        A clip:<folder> scorer's relative folder starts at the manifest's folder."""
        fields = {k: v for k, v in self.selection_settings(concept).items() if k != "every"}
        if not self.selection_settings(concept) or fields.get("scorer") == "none" or self.is_zero_shot(concept):
            return None
        scorer = fields.get("scorer", SelectConfig.scorer)
        if scorer.startswith("clip:"):
            fields["scorer"] = "clip:" + self.resolve(os.path.expanduser(scorer.removeprefix("clip:")))
        return SelectConfig(**fields)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(self.source) if self.source else "."

    def resolve(self, uri: str) -> str:
        """A manifest-relative path -> a path or URI that means the same from any working directory."""
        if "://" in uri or os.path.isabs(uri):
            return uri
        return str(Path(self.base_dir, uri))

    def storage_root(self, override: str | None = None) -> str:
        """--root, else PERFUSION_BATCH_ROOT, else the manifest's root (relative to the manifest's folder)."""
        return override or os.environ.get(ROOT_ENV) or self.resolve(self.root)

    def base_model_path(self, zero_shot: bool = False) -> str:
        """A built-in base or a hub id stays as it is; a relative local path starts at the manifest's folder.
        zero_shot=True: the zero-shot products' base (zero_shot.base_model)."""
        spec = self.zero_shot.base_model if zero_shot else self.base_model
        if spec in BUILTIN_BASES or spec.startswith(("/", "~")):
            return spec
        candidate = self.resolve(spec)
        return candidate if os.path.exists(candidate) else spec

    def selected_concepts(self, job: RenderJob) -> list[ConceptSpec]:
        """The concepts a job's selection names (all by default) whose tags match, in name order."""
        chosen = job.selection()
        pool = self.concepts if chosen.names is None else [c for c in self.concepts if c.name in chosen.names]
        matching = [c for c in pool if all(str(c.tags.get(k)) == str(v) for k, v in chosen.tags.items())]
        return sorted(matching, key=lambda c: c.name)


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


def duplicate_key_problems(text: str) -> list[Problem]:
    """Every key given twice in one mapping, with both lines. Plain YAML keeps the last value, so a second
    `superclass:` would silently replace the first and a second `concepts:` drop the whole first list."""
    found: list[tuple[int, Problem]] = []
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in first_line:
                        first = first_line[key.value]
                        message = f"line {line}: duplicate key {key.value!r} (first on line {first}): keep one"
                        found.append((line, Problem("", message)))
                    else:
                        first_line[key.value] = line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return [problem for _, problem in sorted(found, key=lambda item: item[0])]


def parse_manifest(text: str, source: str = "<manifest>") -> Manifest:
    try:
        document = yaml.safe_load(text)
        duplicates = duplicate_key_problems(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(source, [Problem("", f"not valid YAML: {where}{problem}")]) from None
    if duplicates:
        raise ManifestError(source, duplicates)
    if not isinstance(document, dict):
        raise ManifestError(source, [Problem("", "expected a mapping with version, catalog and concepts")])
    try:
        manifest = Manifest.model_validate(document | {"source": source})
    except ValidationError as error:
        raise ManifestError(source, [_problem(e) for e in error.errors()]) from None
    if manifest.concepts_from is not None:
        manifest = _with_table_concepts(manifest)
    problems = semantic_problems(manifest)
    if problems:
        raise ManifestError(source, problems)
    return manifest


def _with_table_concepts(manifest: Manifest) -> Manifest:
    """The manifest with its product table's rows appended to its concepts, each row checked as an inline
    concept would be; every problem names the table, row and column."""
    spec = manifest.concepts_from
    assert spec is not None
    problems = [
        Problem(f"concepts_from.columns.training.{name}", "not a training field (see perfusion.TrainConfig)")
        for name in spec.columns.training
        if name not in field_types()
    ]
    try:
        rows = read_concepts(spec.table, manifest.base_dir, spec.format, spec.columns.model_dump())
    except ProductTableError as error:
        raise ManifestError(manifest.source, problems + [Problem(p.where, p.message) for p in error.problems]) from None
    concepts = list(manifest.concepts)
    for row, document in enumerate(rows.documents):
        try:
            concepts.append(ConceptSpec.model_validate(document))
        except ValidationError as error:
            for e in error.errors():
                loc = [str(part) for part in e["loc"]]
                field = ".".join(loc[:2]) if loc[0] in ("training", "tags") and len(loc) > 1 else loc[0]
                problems.append(Problem(rows.where(row, field), _problem(e).message))
    if problems:
        raise ManifestError(manifest.source, problems)
    if not rows.documents:
        raise ManifestError(manifest.source, [Problem("concepts_from.table", f"{spec.table} has no rows")])
    extended = manifest.model_copy(update={"concepts": concepts})
    extended._table = rows
    return extended


def semantic_problems(manifest: Manifest) -> list[Problem]:
    """Rules across fields: names safe as file names and unique, tokens well-formed and unique, masks paired."""
    problems: list[Problem] = []
    if not manifest.concepts:
        problems.append(Problem("concepts", "none given: list them here, or give a product table in concepts_from"))
    if not NAME_PATTERN.match(manifest.catalog):
        problems.append(Problem("catalog", f"{manifest.catalog!r} is not a valid catalog name: use {NAME_RULE}"))
    first_by_name: dict[str, int] = {}
    first_by_token: dict[str, int] = {}
    for index, spec in enumerate(manifest.concepts):
        path = functools.partial(manifest.concept_path, index)  # path("superclass"): "concepts[3].superclass"
        if not NAME_PATTERN.match(spec.name):
            problems.append(
                Problem(
                    path("name"),
                    f"{spec.name!r} is not a valid concept name (it names files in the store): use {NAME_RULE}",
                )
            )
        elif spec.name in first_by_name:
            also = manifest.concept_path(first_by_name[spec.name])
            problems.append(Problem(path("name"), f"duplicate name {spec.name!r} (also {also})"))
        else:
            first_by_name[spec.name] = index
        token = spec.concept_token
        if (wrong := token_problem(token)) is not None:
            field = "token" if spec.token is not None else "name"
            hint = (
                ""
                if spec.token is not None
                else " (the token is the name in angle brackets: shorten the name or give the concept a token)"
            )
            problems.append(Problem(path(field), f"{wrong}{hint}"))
        elif token in first_by_token:
            also = manifest.concept_path(first_by_token[token])
            problems.append(Problem(path("token"), f"duplicate token {token!r} (also {also})"))
        else:
            first_by_token[token] = index
        if not spec.superclass.strip():
            problems.append(Problem(path("superclass"), "must name the concept's class, e.g. 'mug'"))
        elif (wrong := superclass_problem(spec.superclass)) is not None:
            problems.append(Problem(path("superclass"), wrong))
        for position, image in enumerate(spec.images):
            if not image.strip():
                problems.append(Problem(path(f"images[{position}]"), "empty path"))
        own = spec.training.values()
        if manifest.is_zero_shot(spec):
            problems += _zero_shot_problems(spec, path)
        problems += [p for p in _selection_problems(manifest, spec, path) if p not in problems]
        for name, message in settings_problems(manifest.training_config(spec)):
            problem = Problem(path(f"training.{name}") if name in own else f"training.{name}", message)
            if problem not in problems:  # a catalog default's problem is reported once, not once per concept
                problems.append(problem)
    first_by_job: dict[str, int] = {}
    for index, job in enumerate(manifest.renders):
        at = f"renders[{index}]"
        if not NAME_PATTERN.match(job.name):
            problems.append(
                Problem(f"{at}.name", f"{job.name!r} is not a valid job name (it names files): use {NAME_RULE}")
            )
        elif job.name in first_by_job:
            problems.append(
                Problem(f"{at}.name", f"duplicate job name {job.name!r} (also renders[{first_by_job[job.name]}])")
            )
        else:
            first_by_job[job.name] = index
        problems += _render_job_problems(manifest, job, at, set(first_by_name))
    return problems


def _zero_shot_problems(spec: ConceptSpec, at: Callable[[str], str]) -> list[Problem]:
    """A zero-shot product is onboarded, not trained: its own training fields (but method) and masks mean
    nothing, and are refused rather than ignored."""
    problems = [
        Problem(at(f"training.{name}"), "a zero-shot product is not trained: remove it (only method applies)")
        for name in spec.training.values()
        if name != "method"
    ]
    if spec.masks is not None:
        problems.append(Problem(at("masks"), "a zero-shot product's adapter reads whole photos: remove its masks"))
    return problems


def selection_path(spec: ConceptSpec, at: Callable[[str], str], field: str) -> str:
    """Where a `training.select` field of a concept was set: its own block (at("training.select.every") =
    "concepts[3].training.select.every", Manifest.concept_path) or the catalog's."""
    own = {k for k, v in (spec.training.values().get("select") or {}).items() if v is not None}
    return at(f"training.select.{field}") if field in own else f"training.select.{field}"


def _selection_problems(manifest: Manifest, spec: ConceptSpec, at: Callable[[str], str]) -> list[Problem]:
    """A scorer that is well-formed and fits the base, and a cadence that scores at least once."""
    settings = manifest.selection_settings(spec)
    if not settings or manifest.is_zero_shot(spec):  # a zero-shot product's own select is refused above
        return []
    where = functools.partial(selection_path, spec, at)
    problems = []
    scorer = settings.get("scorer", SelectConfig.scorer)
    if (wrong := scorer_problem(scorer)) is not None:
        problems.append(Problem(where("scorer"), wrong))
    elif scorer == "toy" and manifest.base_model != "toy":
        problems.append(
            Problem(
                where("scorer"),
                f"'toy' scores the toy base only; base_model {manifest.base_model!r} has no built-in scorer: "
                "use 'clip:<path to a local CLIP model folder>' or 'none'",
            )
        )
    if scorer != "none" and manifest.training_config(spec).get("method") == "residuals":
        problems.append(
            Problem(
                where("scorer"),
                "step selection chooses a Perfusion concept's step and gate; a residual concept (method: residuals) "
                "has no gate: set scorer: none for it, or remove training.select",
            )
        )
    steps = manifest.training_config(spec).get("steps", TrainConfig.steps)
    every = settings.get("every")
    if every is not None and scorer != "none" and every > steps:
        problems.append(
            Problem(where("every"), f"{every} is more than the {steps} training steps: use at most {steps}")
        )
    return problems


def placeholders(template: str) -> list[str]:
    """The placeholder names of a prompt template, in order: "{a} next to {b}" -> ["a", "b"].
    ValueError naming the problem for anything but {a}, {b}, ... used once each without gaps."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:
        raise ValueError(f"not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    names = []
    for name, spec, conversion in fields:
        if len(name) != 1 or not "a" <= name <= "z" or spec or conversion:
            raise ValueError(f"{{{name}}} is not a placeholder: use {{a}}, {{b}}, ... for the concepts")
        if name in names:
            raise ValueError(f"{{{name}}} appears twice: one concept per placeholder")
        names.append(name)
    expected = [chr(ord("a") + i) for i in range(len(names))]
    if sorted(names) != expected:
        raise ValueError(f"placeholders {names} must be {expected} (one letter each, from {{a}}, without gaps)")
    return sorted(names)


def _render_job_problems(manifest: Manifest, job: RenderJob, at: str, known: set[str]) -> list[Problem]:
    """Names that exist, templates that parse, and a concept for every placeholder of every prompt."""
    problems: list[Problem] = []

    def unknown(name: str, where: str) -> None:
        if name not in known:
            problems.append(Problem(where, f"no concept named {name!r} in this manifest (known: {sorted(known)})"))

    selection = job.selection()
    for position, name in enumerate(selection.names or []):
        unknown(name, f"{at}.concepts.names[{position}]")
    for position, combination in enumerate(job.combinations or []):
        for slot, name in enumerate(combination):
            unknown(name, f"{at}.combinations[{position}][{slot}]")
        if len(set(combination)) != len(combination):
            problems.append(Problem(f"{at}.combinations[{position}]", "a concept appears twice in one combination"))
    selected = manifest.selected_concepts(job)
    rendered = {c.name for c in selected} | {n for c in job.combinations or [] for n in c}
    for name in job.gates:
        if name not in known:
            unknown(name, f"{at}.gates.{name}")
        elif name not in rendered:
            problems.append(
                Problem(
                    f"{at}.gates.{name}",
                    f"{name!r} is not rendered by this job (it renders {sorted(rendered)}): remove the override "
                    "or add the concept to the job's concepts",
                )
            )
    if not selected and job.combinations is None:
        problems.append(Problem(f"{at}.concepts", "selects no concept (check the names and tags)"))
    problems += _zero_shot_job_problems(manifest, job, at, rendered & known)
    for position, template in enumerate(job.prompts):
        where = f"{at}.prompts[{position}]"
        try:
            count = len(placeholders(template))
        except ValueError as error:
            problems.append(Problem(where, str(error)))
            continue
        if count and job.combinations is not None and not any(len(c) == count for c in job.combinations):
            problems.append(
                Problem(where, f"has {count} placeholder(s) but no entry of {at}.combinations has {count} concept(s)")
            )
        elif count and job.combinations is None and 0 < len(selected) < count:
            missing = ", ".join(f"{{{chr(ord('a') + i)}}}" for i in range(len(selected), count))
            problems.append(
                Problem(where, f"placeholder(s) {missing} have no concept: the job selects only {len(selected)}")
            )
        elif count > 1 and job.combinations is None and selected and max(map(len, kinds(manifest, selected))) < count:
            trained, zero_shot = kinds(manifest, selected)
            problems.append(
                Problem(
                    where,
                    f"has {count} placeholders, but no {count} of the selected products share a base: zero-shot "
                    f"products ({len(zero_shot)}) and trained ones ({len(trained)}) render on different bases, "
                    "never in one image",
                )
            )
    return problems


def kinds(manifest: Manifest, concepts: list[ConceptSpec]) -> tuple[list[str], list[str]]:
    """(trained, zero-shot) names of `concepts`: each kind renders on its own base."""
    zero_shot = manifest.zero_shot_names()
    return [c.name for c in concepts if c.name not in zero_shot], [c.name for c in concepts if c.name in zero_shot]


def _zero_shot_job_problems(manifest: Manifest, job: RenderJob, at: str, rendered: set[str]) -> list[Problem]:
    """What a job asks of zero-shot products that their base cannot do: share an image with a trained
    product, a gate, another resolution or sampler."""
    zero_shot = manifest.zero_shot_names()
    problems = []
    for position, combination in enumerate(job.combinations or []):
        mine = [n for n in combination if n in zero_shot]
        if mine and len(mine) < len(combination):
            others = [n for n in combination if n not in zero_shot]
            problems.append(
                Problem(
                    f"{at}.combinations[{position}]",
                    f"mixes zero-shot products {mine} with trained ones {others}: they render on different bases "
                    f"({manifest.zero_shot.base_model!r} and {manifest.base_model!r}), never in one image; "
                    "combine products of one kind",
                )
            )
    for name in job.gates:
        if name in zero_shot:
            problems.append(
                Problem(f"{at}.gates.{name}", f"{name!r} is a zero-shot product: it has no gate to override")
            )
    if rendered & zero_shot:
        if job.resolution is not None:
            problems.append(
                Problem(
                    f"{at}.resolution",
                    "zero-shot products render at their MM-DiT base's own size: remove resolution, or render them "
                    "in a job of their own without it",
                )
            )
        if job.scheduler != "default":
            problems.append(
                Problem(
                    f"{at}.scheduler",
                    "zero-shot products render with their MM-DiT base's rectified-flow sampler: use 'default', or "
                    "render them in a job of their own",
                )
            )
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
