"""Pipeline fixtures: one embedded Ray per test session, and small catalogs on the tiny model."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pipeline.demo import PRODUCTS, product_images

TINY_TRAINING = "{steps: 4, batch_size: 2}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto) on loopback. Its endpoint and test credentials go into the
    environment BEFORE Ray starts, so Ray workers see them as they would on a cluster."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """An embedded Ray with 2 CPUs, shared by every test that needs one (~5 s to start)."""
    import ray

    from pipeline import jobs

    os.environ.pop("RAY_ADDRESS", None)
    jobs.ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def write_catalog(folder: Path, root: str, names: tuple[str, ...] = ("mug", "bag", "cup")) -> Path:
    """A catalog of tiny-model concepts with 3 photos each under folder/photos/<name>/."""
    entries = []
    for index, name in enumerate(names):
        photos = folder / "photos" / name
        photos.mkdir(parents=True, exist_ok=True)
        for number, photo in enumerate(product_images(PRODUCTS[index % 2], count=3, seed=index)):
            photo.save(photos / f"{number}.png")
        entries.append(
            f"  - name: {name}\n    superclass: {name}\n    images: [photos/{name}/*.png]\n"
            f"    tags: {{sku: SKU-{index}, category: {'bags' if name == 'bag' else 'kitchen'}}}\n"
        )
    manifest = folder / "catalog.yaml"
    manifest.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            catalog: test-shop
            root: {root}
            base_model: tiny
            training: {TINY_TRAINING}
            concepts:
            """
        )
        + "".join(entries)
    )
    return manifest
