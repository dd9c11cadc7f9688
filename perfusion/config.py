"""The settings of a concept training and the form of a concept token: plain Python, no torch.

The one owner of these rules: training checks them, and the catalog manifest (pipeline/manifest.py) derives
its `training:` schema from TrainConfig's fields and checks tokens with TOKEN_PATTERN, so a manifest that
validates cannot fail in training over a setting or a token. Importing this module does not import torch
(perfusion/__init__.py loads the rest of the package on first use).

A field's bounds live in its metadata ({"ge": 1}, {"gt": 0}, {"lt": 1}, ...) and its choices in its Literal
type; settings_problems() checks both, plus the rules across fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from perfusion.errors import TrainingError

DEFAULT_BETA, DEFAULT_TAU = 0.7, 0.15  # inference gate (paper: tau 0.15, beta 0.6-0.75 for local locking)

# Lower-case (CLIP lower-cases its input), at most 63 characters before the optional angle brackets.
TOKEN_PATTERN = re.compile(r"^<?[a-z0-9][a-z0-9_.\-]{0,62}>?$")
TOKEN_RULE = (
    "use 1-63 lower-case letters, digits, '-', '_' or '.', starting with a letter or digit, optionally in "
    "angle brackets, e.g. '<sku-123>'"
)

_COMPARE = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _bounded(default: Any, **bounds: float) -> Any:
    return field(default=default, metadata=bounds)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _bounded(400, ge=1, le=100_000)  # paper: at most 400 (210 on average)
    batch_size: int = _bounded(16, ge=1)  # paper: 16 images per optimizer step
    grad_accumulation: int = _bounded(1, ge=1)  # micro-batch = batch_size / grad_accumulation (same result)
    lr_value: float = _bounded(0.03, gt=0)  # o*_V (paper)
    lr_embedding: float = _bounded(0.006, gt=0)  # the concept token's embedding (paper)
    weight_decay: float = _bounded(0.0, ge=0)  # AdamW; decay would pull o*_V and the embedding toward zero
    # "constant" (the paper) or "cosine": both rates fall to 0 at the last step, so late steps settle.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # The saved concept is the mean of the trained tensors (embedding, o*_V, o*_K, i*) over this last fraction
    # of the steps (0: the last step's tensors): tail averaging (SWA, Izmailov et al. 2018). At a constant
    # rate the last step is one draw of a random walk; the mean keeps what every late step agrees on.
    average_tail: float = _bounded(0.0, ge=0, lt=1)
    # The embedding's norm is kept <= this x the superclass word's (None: unbounded). A causal text encoder
    # reads every word after the concept's token through it: an embedding far outside the norms of the words
    # the encoder was trained on garbles them (the background, a second object).
    embedding_norm_cap: float | None = _bounded(1.5, gt=0)
    train_beta: float = 0.75  # training-time gate (paper: b=0.75, T=0.1)
    train_tau: float = _bounded(0.1, gt=0)
    inference_beta: float = DEFAULT_BETA  # written into the concept as its default gate
    inference_tau: float = _bounded(DEFAULT_TAU, gt=0)
    ema_decay: float = _bounded(0.99, ge=0, lt=1)  # i* <- decay * i* + (1 - decay) * mean concept encoding
    resolution: int | None = _bounded(None, ge=8)  # None: the base model's native size
    flip_probability: float = _bounded(0.5, ge=0, le=1)  # horizontal flips; 0 for asymmetric concepts
    select_every: int = _bounded(25, ge=1)  # step-selection cadence (paper: every 25 steps)
    lock_keys: bool = True  # False: the "trained keys" ablation, o*_K trained like o*_V
    # "textual_inversion": the embedding row only, no rank-1 edit (a baseline); "residuals": Personalized
    # Residuals (RESIDUALS.md), whose own defaults are METHOD_DEFAULTS["residuals"]; "zero-shot": no training,
    # the photos onboarded for a DynaIP adapter on an MM-DiT base (DYNAIP.md; the other fields are unused)
    method: Literal["perfusion", "textual_inversion", "residuals", "zero-shot"] = "perfusion"
    # Residuals only: rank r_i = ceil(residual_rank x channels) of each proj_out's dW = A B (paper: 0.05),
    # their rate, and whether the concept token's embedding learns too (default: kept at its initialisation)
    residual_rank: float = _bounded(0.05, gt=0, le=1)
    lr_residual: float = _bounded(1e-3, gt=0)
    residual_train_embedding: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, none on CPU
    seed: int = 0
    templates: tuple[str, ...] | None = None  # None: the base model's own (BaseModel.templates)

    def __post_init__(self) -> None:
        problems = settings_problems({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problems:
            raise TrainingError("invalid training config: " + "; ".join(f"{f} {m}" for f, m in problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_method(cls, **settings: Any) -> TrainConfig:
        """A config from `settings`, the fields not given taking the method's defaults (METHOD_DEFAULTS)."""
        return cls(**with_method_defaults(settings))


# Where a method's paper recipe differs from Perfusion's field defaults: applied to the fields not given.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "residuals": {"steps": 150, "batch_size": 4},  # Ham et al.: 150 steps, batch 4, lr 1e-3
}


def with_method_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig fields: the method's defaults, then `settings` (what a manifest or a caller gave)."""
    return METHOD_DEFAULTS.get(str(settings.get("method", "perfusion")), {}) | dict(settings)


# A selection scorer: "toy" (the toy world's CLIP; the toy base only), "clip:<folder>" (a local CLIPModel
# folder, for real bases), "none" (no selection).
SCORER_RULE = "use 'toy' (toy base only), 'clip:<path to a local CLIP model folder>' or 'none'"


@dataclass(frozen=True)
class SelectConfig:
    """How a concept's operating point is chosen (paper sec. 4.4; perfusion/selection.py): its training is
    scored every TrainConfig.select_every steps on `samples` validation renders, trained on `seeds` seeds
    (TrainConfig.seed, seed + 1, ...), and the best of those is kept; then, with `gate`, its inference
    (beta, tau) is swept on the same scorer. Costs about seeds x (1 + scoring) training time."""

    scorer: str = "toy"
    seeds: int = _bounded(1, ge=1, le=16)
    samples: int = _bounded(8, ge=1, le=64)  # renders per score: as many "a photo of <c>" and new-context
    gate: bool = True

    def __post_init__(self) -> None:
        problems = [(f, m) for f, m in _bound_problems(self) if f != "scorer"]
        if (wrong := scorer_problem(self.scorer)) is not None:
            problems.append(("scorer", wrong))
        if problems:
            raise TrainingError("invalid selection config: " + "; ".join(f"{f} {m}" for f, m in problems))

    @property
    def clip_folder(self) -> str | None:
        """The folder of a 'clip:<folder>' scorer, else None."""
        return self.scorer.removeprefix("clip:") if self.scorer.startswith("clip:") else None


def scorer_problem(scorer: str) -> str | None:
    """What is wrong with the form of a scorer spec (whether its folder holds a CLIP is checked at planning)."""
    if scorer in {"toy", "none"} or (scorer.startswith("clip:") and scorer.removeprefix("clip:").strip()):
        return None
    return f"{scorer!r} is not a scorer: {SCORER_RULE}"


def _bound_problems(settings: Any) -> list[tuple[str, str]]:
    """(field, what is wrong) for every bound a dataclass instance's fields break."""
    return [
        (spec.name, message)
        for spec in dataclasses.fields(settings)
        for message in _broken_bounds(getattr(settings, spec.name), spec.metadata)
    ]


def _broken_bounds(value: Any, bounds: Mapping[str, float]) -> list[str]:
    """'must be >= 1' for each bound ({"ge": 1}, ...) that `value` breaks; none for None."""
    if value is None:
        return []
    return [f"must be {_COMPARE[b][1]} {limit}" for b, limit in bounds.items() if not _COMPARE[b][0](value, limit)]


def settings_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, what is wrong) for every rule `values` (TrainConfig fields; missing ones take their defaults)
    breaks: unknown names, bounds, choices, and the rules across fields."""
    specs = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
    found = [(name, "is not a training setting") for name in values if name not in specs]
    values = with_method_defaults(values)  # a method's own defaults count as given
    settings = {name: values.get(name, spec.default) for name, spec in specs.items()}
    hints = _hints()
    for name, value in settings.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            found.append((name, f"must be a finite number, not {value}"))
            continue
        found += [(name, message) for message in _broken_bounds(value, specs[name].metadata)]
        choices = literal_choices(hints[name])
        if choices and value not in choices:
            found.append((name, "must be one of " + ", ".join(repr(c) for c in choices)))
    if settings["batch_size"] % max(1, settings["grad_accumulation"]):
        found.append(("batch_size", "must be a multiple of grad_accumulation"))
    templates = settings["templates"]
    if templates is not None and (not templates or any("{}" not in t for t in templates)):
        found.append(("templates", "must be non-empty and each contain '{}' for the concept"))
    return found


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The choices of a Literal type (also inside `X | None`); () for any other type."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    return next((get_args(a) for a in get_args(hint) if get_origin(a) is Literal), ())


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def field_types(settings: type = TrainConfig) -> dict[str, tuple[Any, dict[str, float]]]:
    """Each field's type and bounds (TrainConfig's or SelectConfig's): what a schema built from it (the
    manifest's) checks."""
    hints = _hints() if settings is TrainConfig else get_type_hints(settings)
    return {spec.name: (hints[spec.name], dict(spec.metadata)) for spec in dataclasses.fields(settings)}


def resolution_problem(resolution: int, step: int) -> str | None:
    """What is wrong with an image size for a base whose latent grid is `step` pixels, or None."""
    if resolution % step == 0:
        return None
    lower, upper = max(step, resolution // step * step), (resolution // step + 1) * step
    return f"{resolution} is not a multiple of {step} (the base model's latent grid): use {lower} or {upper}"


SUPERCLASS_RULE = "1-64 characters: words of letters or digits, separated by spaces, '-' or \"'\", e.g. 'teddy bear'"


def superclass_problem(superclass: str) -> str | None:
    """What is wrong with the form of a superclass phrase, or None. Key locking reads the phrase's encoding,
    so markup or symbols ("st@r<>") would lock the concept's keys to noise. How many tokens the base's
    tokenizer splits it into is checked at planning (pipeline/plan.py)."""
    words = superclass.strip()
    if words and len(words) <= 64 and words[0].isalnum() and all(c.isalnum() or c in " -'" for c in words):
        return None
    return f"{superclass!r} is not a superclass phrase: use {SUPERCLASS_RULE}"


def token_problem(token: str) -> str | None:
    """What is wrong with the form of a concept token, or None (collisions need the tokenizer: tokens.py)."""
    return None if TOKEN_PATTERN.match(token) else f"{token!r} is not a valid concept token: {TOKEN_RULE}"
