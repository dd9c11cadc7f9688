"""Shared fixtures: tiny REAL components (seeded), never downloads."""

from __future__ import annotations

import os

# No test may reach the network: the Hub is offline for the whole session (set before diffusers loads).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from PIL import Image

import perfusion
from perfusion.covariance import Covariance
from perfusion.models import BaseModel
from pipeline.demo import PRODUCTS, product_images

FAST = perfusion.TrainConfig(steps=30, batch_size=4)


@pytest.fixture
def base() -> BaseModel:
    """A fresh tiny base per test (0.2 s): tests may attach tokens and processors freely."""
    return perfusion.load_base("tiny")


@pytest.fixture(scope="session")
def covariance() -> Covariance:
    """C of the tiny text encoder from the built-in corpus (every tiny build has the same fingerprint)."""
    return perfusion.estimate_covariance(perfusion.load_base("tiny"))


@pytest.fixture(scope="session")
def toy_covariance() -> Covariance:
    """C of the shipped toy base from its own captions, estimated once for every toy test."""
    return perfusion.estimate_covariance(perfusion.load_base("toy"))


@pytest.fixture(scope="session")
def mug_images() -> list[Image.Image]:
    return product_images(PRODUCTS[0], count=4, seed=0)


@pytest.fixture(scope="session")
def bag_images() -> list[Image.Image]:
    return product_images(PRODUCTS[1], count=4, seed=1)


@pytest.fixture(scope="session")
def trained_pair(covariance: Covariance, mug_images, bag_images) -> tuple[perfusion.Concept, perfusion.Concept]:
    """Two briefly trained concepts, shared by the rendering and file tests."""
    trainer = perfusion.load_base("tiny")
    mug = perfusion.train_concept(trainer, mug_images, "<mug-1>", "mug", FAST, covariance=covariance)
    bag = perfusion.train_concept(trainer, bag_images, "<bag-1>", "teddy bear", FAST, covariance=covariance)
    return mug, bag


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP folder whose text width (32) is the tiny base's: a `clip:<folder>` scorer."""
    from tests.helpers import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
