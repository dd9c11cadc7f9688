"""The toy model's pretraining recipe: unknown-word robustness and an exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perfusion.toyworld import pretrain as pretraining
from perfusion.toyworld.model import build_toy_pipeline
from perfusion.toyworld.pretrain import pretrain, swap_in_unknown_words


def test_unknown_words_replace_the_first_shape_word_and_keep_its_norm():
    pipeline = build_toy_pipeline(weights=None)
    tokenizer = pipeline.tokenizer
    captions = ["a red star on a blue background", "", "a ring and a star", "a photo of a blue background"]
    ids = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    shapes = torch.tensor([tokenizer.convert_tokens_to_ids(f"{w}</w>") for w in ("star", "ring")])
    embeddings = pipeline.text_encoder.get_input_embeddings()(ids).detach()

    torch.manual_seed(0)
    swapped = swap_in_unknown_words(embeddings, ids, shapes, rate=1.0)
    changed = (swapped != embeddings).any(dim=-1).nonzero().tolist()
    assert changed == [[0, 3], [2, 2]]  # "star" in the first caption, "ring" (not "star") in the third
    before = embeddings[[0, 2], [3, 2]].norm(dim=-1).mean()
    torch.testing.assert_close(swapped[[0, 2], [3, 2]].norm(dim=-1), before.expand(2))
    assert torch.equal(swap_in_unknown_words(embeddings, ids, shapes, rate=0.0), embeddings)


def test_a_resumed_pretraining_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining, "CHECKPOINT_MINUTES", 0.0)  # a checkpoint after every step
    settings = {"minutes": 60.0, "batch": 4, "lr": 1e-3, "seed": 3, "steps": 3}
    straight = pretrain(tmp_path / "straight", resume=False, **settings)

    real_batch_of, calls = pretraining.batch_of, []

    def crash_on_the_third_batch(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the machine goes away after step 2's checkpoint
        return real_batch_of(*args, **kwargs)

    monkeypatch.setattr(pretraining, "batch_of", crash_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "resumed", resume=False, **settings)
    assert not (tmp_path / "resumed" / "toy.safetensors").exists()
    monkeypatch.setattr(pretraining, "batch_of", real_batch_of)
    resumed = pretrain(tmp_path / "resumed", resume=True, **settings)

    assert straight["steps"] == resumed["steps"] == 3
    first = load_file(str(tmp_path / "straight" / "toy.safetensors"))
    second = load_file(str(tmp_path / "resumed" / "toy.safetensors"))
    assert first.keys() == second.keys() and len(first) > 100
    assert all(key.startswith("unet.") for key in first)  # the text encoder is the frozen toy CLIP's
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    assert all(torch.equal(first[k], second[k]) for k in first), "the resume changed the weights"


def test_a_second_stage_starts_from_the_given_weights_and_counts_every_step(tmp_path):
    settings = {"minutes": 60.0, "batch": 4, "lr": 1e-3, "resume": False}
    pretrain(tmp_path / "first", steps=2, seed=5, **settings)
    summary = pretrain(tmp_path / "second", steps=1, seed=3, init=tmp_path / "first" / "toy.safetensors", **settings)
    assert summary["init"] == {"weights": "toy.safetensors", "steps": 2}
    with safe_open(str(tmp_path / "second" / "toy.safetensors"), framework="pt") as handle:
        assert handle.metadata()["steps"] == "3"
    first = load_file(str(tmp_path / "first" / "toy.safetensors"))
    second = load_file(str(tmp_path / "second" / "toy.safetensors"))
    own_start = build_toy_pipeline(weights=None, seed=3).unet.state_dict()  # where seed 3 alone would start
    key = "unet.conv_in.weight"
    to_first_stage = (second[key].float() - first[key].float()).norm()
    to_own_start = (second[key].float() - own_start[key[len("unet.") :]]).norm()
    assert to_first_stage < 0.1 * to_own_start


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch):
    from perfusion.toyworld.pretrain import resolve_precision

    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == expected


def test_a_stage_can_switch_the_unet_to_the_words_and_its_weights_say_so(tmp_path):
    settings = {"minutes": 60.0, "batch": 2, "lr": 1e-3, "resume": False, "seed": 1}
    pretrain(tmp_path / "first", steps=1, **settings)
    summary = pretrain(
        tmp_path / "second", steps=1, init=tmp_path / "first" / "toy.safetensors", text_states="words", **settings
    )
    assert summary["text_states"] == "words"
    with safe_open(str(tmp_path / "second" / "toy.safetensors"), framework="pt") as handle:
        assert handle.metadata()["text_states"] == "words"
    third = pretrain(tmp_path / "third", steps=1, init=tmp_path / "second" / "toy.safetensors", **settings)
    assert third["text_states"] == "words"  # a later stage keeps what its init reads unless told otherwise
