"""Perfusion: key-locked, gated rank-1 concepts for text-to-image diffusion (Tewel et al., SIGGRAPH 2023).

The method only: torch, diffusers, transformers and safetensors. Usable from a notebook:

    from perfusion import load_base, estimate_covariance, train_concept, TrainConfig
    base = load_base("tiny")                       # or a local diffusers folder
    covariance = estimate_covariance(base)         # C^-1 of the text encoder, once per base model
    concept = train_concept(base, images, "<my-mug>", "mug", TrainConfig(steps=200), covariance=covariance)
    concept.save("my-mug.safetensors")

`import perfusion` is light: the names below load their modules (torch, diffusers) on first use, so a
driver that only plans (pipeline/manifest.py reads perfusion.config) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from perfusion.config import SelectConfig, TrainConfig
from perfusion.errors import (
    BaseModelError,
    ConceptFileError,
    ConceptTokenError,
    CovarianceError,
    PerfusionError,
    RenderError,
    TrainingError,
)
from perfusion.methods import METHODS, Method, load_concept_file, method_for
from perfusion.registry import BUILTIN_BASES

if TYPE_CHECKING:
    from perfusion.attention import PerfusionAttnProcessor, PerfusionCall, install_processors
    from perfusion.attention_maps import CrossAttentionMaps
    from perfusion.concept import Concept, check_compatible, load_concept
    from perfusion.covariance import (
        Covariance,
        cached_covariance,
        covariance_from_bytes,
        covariance_to_bytes,
        estimate_covariance,
        load_covariance,
        save_covariance,
    )
    from perfusion.models import BaseModel, load_base
    from perfusion.sampling import ConceptRenderer, RenderRequest, RenderSettings
    from perfusion.tokens import prompt_tokens
    from perfusion.training import StepInfo, denoising_loss, train_concept
    from perfusion.zero_shot import ZeroShotConcept, onboard_concept
    from perfusion.zero_shot_render import ZeroShotRenderer

_LAZY = {
    "perfusion.attention": ("PerfusionAttnProcessor", "PerfusionCall", "install_processors"),
    "perfusion.attention_maps": ("CrossAttentionMaps",),
    "perfusion.concept": ("Concept", "check_compatible", "load_concept"),
    "perfusion.covariance": (
        "Covariance",
        "cached_covariance",
        "covariance_from_bytes",
        "covariance_to_bytes",
        "estimate_covariance",
        "load_covariance",
        "method_for",
        "prompt_tokens",
        "save_covariance",
    ),
    "perfusion.models": ("BaseModel", "load_base"),
    "perfusion.sampling": ("ConceptRenderer", "RenderRequest", "RenderSettings"),
    "perfusion.tokens": ("prompt_tokens",),
    "perfusion.training": ("StepInfo", "denoising_loss", "train_concept"),
    "perfusion.zero_shot": ("ZeroShotConcept", "onboard_concept"),
    "perfusion.zero_shot_render": ("ZeroShotRenderer",),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    """Load the module that defines `name` on first use (PEP 562); submodules as attributes keep working."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"perfusion.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"perfusion.{name}":
            raise
        raise AttributeError(f"module 'perfusion' has no attribute {name!r}") from None


__version__ = "0.1.0"

__all__ = [
    "BUILTIN_BASES",
    "METHODS",
    "BaseModel",
    "BaseModelError",
    "Concept",
    "ConceptFileError",
    "ConceptRenderer",
    "ConceptTokenError",
    "Covariance",
    "CovarianceError",
    "CrossAttentionMaps",
    "Method",
    "PerfusionAttnProcessor",
    "PerfusionCall",
    "PerfusionError",
    "RenderError",
    "RenderRequest",
    "RenderSettings",
    "SelectConfig",
    "StepInfo",
    "TrainConfig",
    "TrainingError",
    "ZeroShotConcept",
    "ZeroShotRenderer",
    "__version__",
    "cached_covariance",
    "check_compatible",
    "covariance_from_bytes",
    "covariance_to_bytes",
    "denoising_loss",
    "estimate_covariance",
    "install_processors",
    "load_base",
    "load_concept",
    "load_concept_file",
    "load_covariance",
    "method_for",
    "onboard_concept",
    "prompt_tokens",
    "save_covariance",
    "train_concept",
]
