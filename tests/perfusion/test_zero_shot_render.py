"""Zero-shot rendering on the tiny MM-DiT (random weights, random non-zero adapter): prompts naming products by
token, several products routed to their own placeholder words, and requests that cannot be served refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import perfusion
from perfusion.errors import ConceptFileError, RenderError
from perfusion.sampling import RenderRequest, RenderSettings
from perfusion.zero_shot import image_prompt_call
from perfusion.zero_shot_render import ZeroShotRenderer
from pipeline.demo import PRODUCTS, product_images


@pytest.fixture(scope="module")
def renderer():  # type: ignore[no-untyped-def]
    base = perfusion.load_base("tiny-mmdit")
    renderer = ZeroShotRenderer(base)
    for index, (name, superclass) in enumerate((("mug", "cup"), ("bag", "box"))):
        photos = product_images(PRODUCTS[index], count=3, seed=index)
        renderer.attach(perfusion.onboard_concept(base, photos, f"<{name}>", superclass))
    return renderer


def test_a_prompt_names_products_by_token_and_each_is_tied_to_its_word(renderer) -> None:  # type: ignore[no-untyped-def]
    text, products, positions = renderer.prepare(RenderRequest("<mug> next to <bag> on a white background"))
    assert text == "a cup next to a box on a white background"
    assert [p.name for p in products] == ["mug", "bag"]
    ids = renderer.base.pipeline.tokenizer(text).input_ids
    words = [renderer.base.pipeline.tokenizer.decode([ids[p]]).strip() for p in positions]
    assert words == ["cup", "box"]
    assert renderer.prepare(RenderRequest("a photo of the <mug>"))[0] == "a photo of the cup"  # its own article kept


def test_requests_that_cannot_be_served_are_refused(renderer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RenderError, match=r"references 2 products .* has 1 placeholder"):
        renderer.prepare(
            RenderRequest("<mug> on white", concepts=("<mug>", "<bag>"))
        )  # more references than placeholders
    with pytest.raises(RenderError, match="2 placeholder"):
        renderer.prepare(RenderRequest("<mug> and <mug>"))
    with pytest.raises(RenderError, match="not attached"):
        renderer.prepare(RenderRequest("<lamp> on white"))
    other = perfusion.onboard_concept(perfusion.load_base("tiny-mmdit"), product_images(PRODUCTS[0], 1), "<pan>", "pan")
    other.base_fingerprint = "another-base"
    with pytest.raises(ConceptFileError, match="another base"):
        renderer.attach(other)
    with pytest.raises(perfusion.BaseModelError, match="UNet base"):
        ZeroShotRenderer(perfusion.load_base("tiny"))


def test_routing_splits_each_image_token_among_the_products_without_changing_one_product(renderer) -> None:  # type: ignore[no-untyped-def]
    """Two copies of one product split every position's injection into parts that are each the single
    product's: the routed sum is the single-product injection exactly (the shares sum to 1)."""
    pipeline, mug = renderer.base.pipeline, renderer.concepts["<mug>"]
    text, _, positions = renderer.prepare(RenderRequest("<mug> next to <bag>"))
    single = image_prompt_call([[mug]], guided=False)
    routed = image_prompt_call([[mug, mug]], guided=False, positions=[positions])
    ids = pipeline.token_ids([text])
    states, pooled = pipeline.encode_prompts(ids)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])

    def velocity(call):  # type: ignore[no-untyped-def]
        return pipeline.velocity(latents, sigma, states, pooled, {"image_prompt": call})

    torch.testing.assert_close(velocity(routed), velocity(single), atol=1e-5, rtol=0)
    two = image_prompt_call([[mug, renderer.concepts["<bag>"]]], guided=False, positions=[positions])
    assert (velocity(two) - velocity(single)).abs().max() > 1e-4  # the second product changes what renders


def test_a_batch_renders_each_row_as_alone(renderer) -> None:  # type: ignore[no-untyped-def]
    settings = RenderSettings(steps=2, guidance_scale=2.0, batch_size=8)
    requests = [
        RenderRequest("<mug> next to <bag> on a white background", seed=3),
        RenderRequest("<bag> on a white background", seed=4),
        RenderRequest("a white background", seed=5),
    ]
    batch = renderer.render(requests, settings)
    alone = renderer.render(requests[:1], settings)
    assert [image.size for image in batch] == [(32, 32)] * 3
    difference = np.abs(np.asarray(batch[0], dtype=int) - np.asarray(alone[0], dtype=int)).max()
    assert difference <= 1  # one 8-bit level of float noise at most
    assert np.asarray(batch[1]).tobytes() != np.asarray(batch[2]).tobytes()


def test_a_zero_shot_concept_file_is_refused_on_a_unet_base(renderer) -> None:  # type: ignore[no-untyped-def]
    data = renderer.concepts["<mug>"].to_bytes()
    with pytest.raises(ConceptFileError, match="UNet base"):
        perfusion.load_concept_file(data, perfusion.load_base("tiny"), name="mug.safetensors")
    loaded = perfusion.load_concept_file(data, renderer.base, name="mug.safetensors")
    assert (loaded.token, loaded.superclass, loaded.references) == ("<mug>", "cup", 3)
    torch.testing.assert_close(loaded.image_prompt(), renderer.concepts["<mug>"].image_prompt(), atol=2e-2, rtol=0)


def test_prompts_are_rebuilt_in_words_whatever_the_token_looks_like(renderer) -> None:  # type: ignore[no-untyped-def]
    base = renderer.base
    bare = perfusion.onboard_concept(base, product_images(PRODUCTS[1], 1), "sku123", "apple")
    renderer.attach(bare)
    assert renderer.prepare(RenderRequest("a photo of<mug>"))[0] == "a photo of a cup"
    text, products, _ = renderer.prepare(RenderRequest("sku123 beside <mug>"))
    assert text == "an apple beside a cup" and [p.token for p in products] == ["sku123", "<mug>"]
    with pytest.raises(RenderError, match="no gate"):
        renderer.prepare(RenderRequest("<mug>", gates={"<mug>": (0.5, 0.1)}))
    with pytest.raises(RenderError, match="their base's 32x32"):
        renderer.render([RenderRequest("<mug>")], RenderSettings(steps=1, height=64, width=64))


def test_a_product_that_keeps_failing_transiently_fails_alone_in_its_chunk(monkeypatch) -> None:
    """Onboarding runs 64 products a Ray task: one product's transient failure is retried in the task and
    then recorded for that product, never re-running (or failing) the chunk."""
    import dataclasses

    import pipeline.tasks
    from pipeline.tasks import TrainTask
    from pipeline.train import onboard_task
    from pipeline.worker import TransientError

    def task(name: str) -> TrainTask:
        fields = {f.name: "" for f in dataclasses.fields(TrainTask) if f.default is dataclasses.MISSING}
        return TrainTask(**fields | {"name": name, "images": (), "masks": None, "training": {"method": "zero-shot"}})

    calls: list[str] = []

    def flaky(task: TrainTask, progress=None):  # type: ignore[no-untyped-def]
        calls.append(task.name)
        if task.name == "bad":
            raise TransientError("storage hiccup")
        return pipeline.tasks.concept_row(task, "succeeded")

    monkeypatch.setattr(pipeline.tasks, "train_one", flaky)
    rows = onboard_task([task("a"), task("bad"), task("b")])
    assert [(r.name, r.status) for r in rows] == [("a", "succeeded"), ("bad", "failed"), ("b", "succeeded")]
    assert rows[1].error == "gave up after 3 tries: storage hiccup" and calls.count("bad") == 3


def test_the_benchmarks_documented_command_is_accepted() -> None:
    from benchmarks.zero_shot_quality import VARIANTS, ZeroShotConfig

    config = ZeroShotConfig()
    assert config.problems() == [] and set(config.chosen) <= set(VARIANTS) and len(config.chosen) == 6
    assert ZeroShotConfig(variants="nope").problems()[0].startswith("--variants: unknown ['nope']")
