"""The whole method once: train on generated images, save, load into a fresh pipeline, render combined."""

from __future__ import annotations

import numpy as np

import perfusion
from pipeline.demo import DemoProduct, product_images


def test_train_save_load_and_render_with_a_second_concept(covariance, trained_pair, tmp_path):
    lamp = DemoProduct("<lamp-7>", "lamp", (30, 160, 60), 2)
    trainer = perfusion.load_base("tiny")
    concept = perfusion.train_concept(
        trainer,
        product_images(lamp, count=5, seed=3),
        lamp.token,
        lamp.superclass,
        perfusion.TrainConfig(steps=25, batch_size=4),
        covariance=covariance,
    )
    path = tmp_path / "lamp.safetensors"
    assert concept.save(path) == path.stat().st_size

    fresh = perfusion.load_base("tiny")  # a downstream app: only the files
    renderer = perfusion.ConceptRenderer(fresh, covariance)
    renderer.attach(perfusion.load_concept(path, fresh))
    bag_path = tmp_path / "bag.safetensors"
    trained_pair[1].save(bag_path)
    renderer.attach(perfusion.load_concept(bag_path, fresh))

    requests = [
        perfusion.RenderRequest("a photo of <lamp-7> on the beach", seed=11),
        perfusion.RenderRequest("<lamp-7> next to <bag-1> in a kitchen", seed=11),
    ]
    images = renderer.render_arrays(requests, perfusion.RenderSettings(steps=10))
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.abs(images[0] - images[1]).mean() > 1e-3  # the second concept and scene changed the picture
