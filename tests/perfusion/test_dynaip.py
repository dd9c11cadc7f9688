"""DynaIP's adapter core: HMoE fusion and the decoupled image-prompt injection into an MM-DiT."""

from __future__ import annotations

import pytest
import torch

from perfusion.dynaip import HierarchicalFusion, ImagePromptCall, install_adapter
from perfusion.mmdit import build_tiny_mmdit_pipeline


def velocity_inputs(pipeline, rows: int = 2):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, 4, 16, 16, generator=generator)
    states, pooled = pipeline.encode_prompts(pipeline.token_ids(["a photo of a dog"] * rows))
    return latents, torch.full((rows,), 0.6), states, pooled


def test_hmoe_router_weights_sum_to_one_and_can_be_overridden() -> None:
    torch.manual_seed(0)
    fusion = HierarchicalFusion(vision_width=16, width=8, tokens=3, levels=3)
    features = [torch.randn(2, 5, 16) for _ in range(3)]
    tokens, weights = fusion(features)
    assert tokens.shape == (2, 3, 8)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2))
    last_only, _ = fusion(features, weights=torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(last_only, fusion.experts[2](features[2]))
    with pytest.raises(ValueError, match="sum to 1"):
        fusion(features, weights=torch.tensor([0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="3 feature levels"):
        fusion(features[:2])


def test_without_an_image_prompt_the_adapter_is_the_stock_joint_attention() -> None:
    plain = build_tiny_mmdit_pipeline()
    adapted = build_tiny_mmdit_pipeline()
    install_adapter(adapted.transformer, prompt_width=8)
    inputs = velocity_inputs(plain)
    with torch.no_grad():
        expected = plain.velocity(*inputs)
        torch.testing.assert_close(adapted.velocity(*inputs), expected, atol=1e-5, rtol=0)
        empty = ImagePromptCall(torch.randn(2, 4, 8), torch.tensor([False, False]))
        got = adapted.velocity(*inputs, {"image_prompt": empty})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_decoupling_drops_only_the_text_stream_injection() -> None:
    pipeline = build_tiny_mmdit_pipeline()
    processors = install_adapter(pipeline.transformer, prompt_width=8)
    assert len(processors) == 2
    torch.manual_seed(1)
    for p in processors.values():
        for layer in (p.to_v_ip, p.text_v_ip):
            if layer is not None:
                torch.nn.init.normal_(layer.weight, std=0.5)
    inputs = velocity_inputs(pipeline)
    tokens = torch.randn(2, 4, 8)
    present = torch.tensor([True, False])
    with torch.no_grad():
        plain = pipeline.velocity(*inputs)
        image_only = pipeline.velocity(*inputs, {"image_prompt": ImagePromptCall(tokens, present)})
        both = pipeline.velocity(*inputs, {"image_prompt": ImagePromptCall(tokens, present, text_stream=True)})
    assert (image_only[0] - plain[0]).abs().max() > 1e-3  # the product's row changes
    torch.testing.assert_close(image_only[1], plain[1], atol=1e-5, rtol=0)  # the row without one does not
    assert (both[0] - image_only[0]).abs().max() > 1e-4  # the text stream's injection is a different render


def test_the_injection_weights_get_gradients_and_the_base_stays_frozen() -> None:
    pipeline = build_tiny_mmdit_pipeline()
    pipeline.transformer.requires_grad_(False)
    processors = install_adapter(pipeline.transformer, prompt_width=8)
    fusion = HierarchicalFusion(vision_width=16, width=8, tokens=4, levels=3)
    tokens, _ = fusion([torch.randn(2, 5, 16) for _ in range(3)])
    call = ImagePromptCall(tokens, torch.tensor([True, True]), text_stream=True)
    pipeline.velocity(*velocity_inputs(pipeline), {"image_prompt": call}).square().mean().backward()
    first = next(iter(processors.values()))
    assert first.to_v_ip.weight.grad is not None and first.to_v_ip.weight.grad.abs().sum() > 0
    assert first.text_v_ip.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipeline.transformer.parameters() if not p.requires_grad)
    # zero-initialised values: the key and fusion weights get their gradient once the values move
    assert all(p.requires_grad for p in fusion.parameters())


def test_a_unet_is_refused() -> None:
    from perfusion.models import build_tiny_pipeline

    with pytest.raises(ValueError, match="MM-DiT"):
        install_adapter(build_tiny_pipeline().unet, prompt_width=8)


def test_reference_features_come_from_the_low_mid_and_last_layers() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from perfusion.dynaip import feature_levels, reference_features

    assert feature_levels(4) == (1, 2, 4)
    assert feature_levels(24) == (6, 12, 24)
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
    pixels = torch.randn(2, 3, 32, 32)
    features = reference_features(vision, pixels, feature_levels(4))
    assert [f.shape for f in features] == [torch.Size([2, 17, 16])] * 3  # 16 patches + CLS
    hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(features[1], hidden[2])


def test_an_adapter_file_round_trips_and_another_base_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from perfusion.dynaip import DynaIPAdapter
    from perfusion.errors import BaseModelError

    pipeline = build_tiny_mmdit_pipeline()
    torch.manual_seed(0)
    adapter = DynaIPAdapter(pipeline.transformer, vision_width=16, levels=(1, 2, 4))
    path = str(tmp_path / "adapter.safetensors")
    adapter.save(path, base_fingerprint="abc")
    loaded = DynaIPAdapter.load(path, build_tiny_mmdit_pipeline().transformer, 16, base_fingerprint="abc")
    features = [torch.randn(1, 5, 16) for _ in range(3)]
    expected, _ = adapter.fusion(features)
    got, _ = loaded.fusion(features)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # stored in fp16
    with pytest.raises(BaseModelError, match="trained on another base"):
        DynaIPAdapter.load(path, build_tiny_mmdit_pipeline().transformer, 16, base_fingerprint="xyz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(BaseModelError, match=r"junk\.safetensors"):
        DynaIPAdapter.load(str(tmp_path / "junk.safetensors"), pipeline.transformer, 16, base_fingerprint="abc")


def test_installing_an_adapter_leaves_the_base_fingerprint_alone() -> None:
    from perfusion.models import fingerprint

    pipeline = build_tiny_mmdit_pipeline()
    before = fingerprint(pipeline)
    install_adapter(pipeline.transformer, prompt_width=8)
    assert fingerprint(pipeline) == before
