"""Base models: the tiny builder, local loading, fail-fast Hub ids, the fingerprint."""

from __future__ import annotations

import os
import time

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

import perfusion
from perfusion.errors import BaseModelError
from perfusion.models import fingerprint


def test_tiny_is_a_stable_diffusion_shaped_pipeline(base):
    assert isinstance(base.unet, UNet2DConditionModel)
    assert isinstance(base.pipeline.vae, AutoencoderKL)
    assert isinstance(base.text_encoder, CLIPTextModel)
    assert isinstance(base.pipeline.scheduler, DDIMScheduler)
    layers = base.cross_attention_layers()
    assert len(layers) == 7 and all(name.endswith("attn2") for name in layers)
    assert base.resolution == 32
    # the generated BPE vocabulary: corpus words are single tokens, anything else still tokenizes
    assert len(base.tokenizer("a teddy bear on a marble counter", add_special_tokens=False).input_ids) == 7
    assert base.tokenizer.convert_ids_to_tokens(base.tokenizer("zyx").input_ids)[0] == "<|startoftext|>"


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone(base):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    again = perfusion.load_base("tiny")
    assert torch.equal(torch.rand(1), expected)
    assert again.fingerprint == base.fingerprint
    for (name, a), b in zip(base.unet.state_dict().items(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_builds_fast():
    started = time.perf_counter()
    perfusion.load_base("tiny")
    # Not a benchmark: a generous bound that catches an accidental download or a huge config.
    assert time.perf_counter() - started < 10


def test_fingerprint_ignores_dtype_but_sees_key_value_weights(base):
    original = base.fingerprint
    base.pipeline.to(torch.float16)
    assert fingerprint(base.pipeline) == original
    base.pipeline.to(torch.float32)
    layer = next(iter(base.cross_attention_layers().values()))
    layer.to_v.weight.data[0, 0] += 1.0
    assert fingerprint(base.pipeline) != original


def test_fingerprint_ignores_attached_concept_tokens(base, trained_pair, covariance):
    original = base.fingerprint
    perfusion.ConceptRenderer(base, covariance).attach(trained_pair[0])
    assert fingerprint(base.pipeline) == original


def test_local_diffusers_folder_round_trip(base, tmp_path):
    base.pipeline.save_pretrained(tmp_path)
    loaded = perfusion.load_base(str(tmp_path))
    assert loaded.fingerprint == base.fingerprint
    assert loaded.tokenizer("a teddy bear").input_ids == base.tokenizer("a teddy bear").input_ids


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(BaseModelError, match=r"model_index\.json"):
        perfusion.load_base(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not loaded")
    with pytest.raises(BaseModelError, match=r"only \.safetensors"):
        perfusion.load_base(str(checkpoint))


def test_broken_single_file_checkpoint_names_the_config_fix(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\x00" * 64)
    with pytest.raises(BaseModelError, match="config="):
        perfusion.load_base(str(checkpoint))


def test_unknown_spec_lists_what_is_accepted():
    listed = r"a built-in base \('tiny', 'toy', 'tiny-mmdit', 'toy-mmdit'\), a local diffusers folder"
    with pytest.raises(BaseModelError, match=listed):
        perfusion.load_base("no/such/thing/here")


def test_hub_id_fails_fast_offline_with_a_local_path_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    started = time.perf_counter()
    with pytest.raises(BaseModelError, match=r"pass the\s+local folder") as caught:
        perfusion.load_base("someone/some-model")
    assert "`hf download someone/some-model --local-dir DIR`" in str(caught.value)  # the id, not "{repo_id}"
    assert time.perf_counter() - started < 30  # generous: the point is no long HTTP retries


def test_built_in_bases_are_registered_in_one_place_and_bring_their_own_language():
    assert set(perfusion.BUILTIN_BASES) >= {"tiny", "toy"}
    tiny = perfusion.load_base("tiny")
    assert tiny.templates == perfusion.corpus.NEUTRAL_TEMPLATES  # a real text encoder's language
    assert tiny.captions() == perfusion.corpus.builtin_prompts()
    toy = perfusion.load_base("toy")
    assert toy.templates != tiny.templates and all("{}" in t for t in toy.templates)
    assert toy.captions_file is not None and len(toy.captions()) >= 1000
