"""Perfusion: key-locked, gated rank-1 concepts for text-to-image diffusion (Tewel et al., SIGGRAPH 2023).

The method only: torch, diffusers, transformers and safetensors. Usable from a notebook:

    from perfusion import load_base, estimate_covariance, train_concept, TrainConfig
    base = load_base("tiny")                       # or a local diffusers folder
    covariance = estimate_covariance(base)         # C^-1 of the text encoder, once per base model
    concept = train_concept(base, images, "<my-mug>", "mug", TrainConfig(steps=200), covariance=covariance)
    concept.save("my-mug.safetensors")
"""

from perfusion.attention import PerfusionAttnProcessor, PerfusionCall, install_processors
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
from perfusion.errors import (
    BaseModelError,
    ConceptFileError,
    ConceptTokenError,
    CovarianceError,
    PerfusionError,
    RenderError,
    TrainingError,
)
from perfusion.models import BUILTIN_BASES, BaseModel, load_base
from perfusion.sampling import ConceptRenderer, RenderRequest, RenderSettings
from perfusion.training import StepInfo, TrainConfig, denoising_loss, train_concept

__version__ = "0.1.0"
METHOD_VERSION = "perfusion-1"  # bump when a change alters what training produces (part of concept keys)

__all__ = [
    "BUILTIN_BASES",
    "METHOD_VERSION",
    "BaseModel",
    "BaseModelError",
    "Concept",
    "ConceptFileError",
    "ConceptRenderer",
    "ConceptTokenError",
    "Covariance",
    "CovarianceError",
    "PerfusionAttnProcessor",
    "PerfusionCall",
    "PerfusionError",
    "RenderError",
    "RenderRequest",
    "RenderSettings",
    "StepInfo",
    "TrainConfig",
    "TrainingError",
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
    "load_covariance",
    "save_covariance",
    "train_concept",
]
