"""Zero-shot concepts: onboarding without training, the image prompt they give, and their file."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from perfusion.dynaip import DynaIPAdapter
from perfusion.errors import ConceptFileError
from perfusion.mmdit import build_tiny_mmdit_pipeline
from perfusion.zero_shot import load_zero_shot_concept, onboard


@pytest.fixture(scope="module")
def parts():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    adapter = DynaIPAdapter(build_tiny_mmdit_pipeline().transformer, vision_width=16, levels=(1, 2, 4), tokens=4)
    return vision, adapter


def test_onboarding_gives_the_adapters_own_image_prompt(parts) -> None:  # type: ignore[no-untyped-def]
    vision, adapter = parts
    pixels = torch.randn(3, 3, 32, 32)
    concept = onboard("mug", "cup", pixels, adapter, vision, base_fingerprint="base")
    assert concept.level_tokens.shape == (3, 3, 4, 32) and concept.router_weights.shape == (3, 3)
    from perfusion.dynaip import reference_features

    expected, _ = adapter.fusion(reference_features(vision, pixels, adapter.levels))
    prompt = concept.image_prompt()
    assert prompt.shape == (12, 32)  # the 3 references' 4 tokens side by side
    torch.testing.assert_close(prompt.view(3, 4, 32), expected, atol=1e-5, rtol=0)
    fine = concept.image_prompt(torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(fine.view(3, 4, 32), concept.level_tokens[:, 0])
    with pytest.raises(ValueError, match="mug: granularity weights must sum to 1"):
        concept.image_prompt(torch.tensor([1.0, 1.0, 0.0]))


def test_the_file_is_small_round_trips_and_names_what_is_wrong(parts) -> None:  # type: ignore[no-untyped-def]
    vision, adapter = parts
    concept = onboard("mug", "cup", torch.randn(3, 3, 32, 32), adapter, vision, base_fingerprint="base")
    data = concept.to_bytes()
    assert len(data) < 64 * 1024 and data == concept.to_bytes()  # the same bytes every time
    loaded = load_zero_shot_concept(data, "base", adapter, name="mug.safetensors")
    assert (loaded.name, loaded.superclass) == ("mug", "cup")
    torch.testing.assert_close(loaded.image_prompt(), concept.image_prompt(), atol=5e-3, rtol=0)
    with pytest.raises(ConceptFileError, match=r"mug\.safetensors: onboarded for another base"):
        load_zero_shot_concept(data, "other", name="mug.safetensors")
    other = DynaIPAdapter(build_tiny_mmdit_pipeline().transformer, vision_width=16, levels=(1, 2, 4))
    with pytest.raises(ConceptFileError, match="another DynaIP adapter"):
        load_zero_shot_concept(data, "base", other, name="mug.safetensors")
    with pytest.raises(ConceptFileError, match="not a safetensors zero-shot concept file"):
        load_zero_shot_concept(b"junk", name="mug.safetensors")


def test_a_batch_renders_each_row_as_alone_whatever_its_neighbours(parts) -> None:  # type: ignore[no-untyped-def]
    from perfusion.zero_shot import image_prompt_call

    vision, _ = parts
    pipeline = build_tiny_mmdit_pipeline()
    torch.manual_seed(2)
    adapter = DynaIPAdapter(pipeline.transformer, vision_width=16, levels=(1, 2, 4), tokens=4)
    for injection in adapter.injections.values():
        torch.nn.init.normal_(injection.to_v_ip.weight, std=0.5)
    one = onboard("mug", "cup", torch.randn(1, 3, 32, 32), adapter, vision, base_fingerprint="base")
    three = onboard("lamp", "cup", torch.randn(3, 3, 32, 32), adapter, vision, base_fingerprint="base")
    prompts, seeds = ["a photo of a cup"] * 3, [0, 1, 2]

    def render(rows):  # type: ignore[no-untyped-def]
        call = image_prompt_call(rows, guided=True)
        return pipeline.sample(
            prompts[: len(rows)], seeds=seeds[: len(rows)], steps=2, joint_attention_kwargs={"image_prompt": call}
        )

    batch = render([[one], [three], []])
    alone = render([[one]])
    torch.testing.assert_close(batch[:1], alone, atol=1e-4, rtol=0)
    plain = pipeline.sample(prompts[2:], seeds=[2], steps=2)
    torch.testing.assert_close(batch[2:], plain, atol=1e-4, rtol=0)  # no product: the base's own render
    assert (batch[1] - pipeline.sample(prompts[1:2], seeds=[1], steps=2)[0]).abs().max() > 1e-3


def test_reference_photos_that_cannot_serve_are_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image

    from perfusion.errors import TrainingError
    from perfusion.zero_shot import reference_pixels

    photo = np.full((40, 48, 3), 255, dtype=np.uint8)
    photo[:, :24] = 0
    pixels = reference_pixels([Image.fromarray(photo)], "mug", size=32)
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels.min() == -1 and pixels.max() == 1  # the toy tower's normalisation: [0, 1] -> [-1, 1]
    gray = tmp_path / "gray.png"
    Image.fromarray(photo[:, :, 0]).save(gray)
    with pytest.raises(TrainingError, match=r"'mug': reference photo .*gray\.png is 'L', not RGB"):
        reference_pixels([str(gray)], "mug", size=32)
    with pytest.raises(TrainingError, match=r"'mug': reference photo #0 is 8x8 pixels"):
        reference_pixels([Image.fromarray(photo[:8, :8])], "mug", size=32)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(TrainingError, match=r"'mug'.*broken\.png cannot be decoded"):
        reference_pixels([str(broken)], "mug", size=32)
    with pytest.raises(TrainingError, match="no reference photos"):
        reference_pixels([], "mug", size=32)
