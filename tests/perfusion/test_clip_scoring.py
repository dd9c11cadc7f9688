"""CLIP-I / CLIP-T from a local CLIP folder, and the folder checks that run before anything loads."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

from perfusion.clip_scoring import ClipFolderError, ClipScorer, check_clip_folder, superclass_prompt


@pytest.fixture(scope="module")
def clip_folder(tiny_clip):
    return tiny_clip


def _images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def test_clip_i_and_clip_t_are_the_mean_cosines_of_the_models_own_embeddings(clip_folder):
    scorer = ClipScorer.from_folder(clip_folder)
    renders, references = _images(3, 0), _images(2, 1)
    prompts = ["a red star", "a blue square on a white background", "a photo of a ring"]
    model = CLIPModel.from_pretrained(clip_folder).eval()

    def image_features(images):  # the model's own path: pixels in [0, 1], normalised with mean 0.5 and std 0.5
        pixels = torch.stack([torch.from_numpy(i.astype(np.float32) / 255).permute(2, 0, 1) for i in images])
        output = model.vision_model(pixel_values=(pixels - 0.5) / 0.5)
        return F.normalize(model.visual_projection(output.pooler_output), dim=-1)

    with torch.no_grad():
        ids = scorer.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        texts = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
        expected_i = (image_features(renders) @ image_features(references).T).mean()
        expected_t = (image_features(renders) * texts).sum(-1).mean()
    assert scorer.image_similarity(renders, references) == pytest.approx(float(expected_i), abs=1e-5)
    assert scorer.text_similarity(renders, prompts) == pytest.approx(float(expected_t), abs=1e-5)
    assert scorer.image_similarity(renders[:1], renders[:1]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per render"):
        scorer.text_similarity(renders, prompts[:2])


def test_the_superclass_replaces_each_concept_token():
    prompt = "<mug> and <bag> on a table"
    assert superclass_prompt(prompt, {"<mug>": "mug", "<bag>": "bag"}) == "mug and bag on a table"


def _copy(folder, tmp_path):
    target = tmp_path / "clip"
    shutil.copytree(folder, target)
    return target


def test_a_folder_that_is_not_a_clip_is_refused_by_name(clip_folder, tmp_path):
    with pytest.raises(ClipFolderError, match=r"does not exist"):
        check_clip_folder(tmp_path / "nowhere")

    no_config = _copy(clip_folder, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(ClipFolderError, match=rf"{no_config}.*no config\.json"):
        ClipScorer.from_folder(no_config)

    text_only = tmp_path / "text-only"
    CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    ).save_pretrained(text_only)
    with pytest.raises(ClipFolderError, match=r"'clip_text_model' config, not a CLIPModel's"):
        check_clip_folder(text_only)

    pickled = _copy(clip_folder, tmp_path / "b")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ClipFolderError, match=r"no \.safetensors weights \(pytorch_model\.bin are pickle files"):
        check_clip_folder(pickled)

    no_tokenizer = _copy(clip_folder, tmp_path / "c")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ClipFolderError, match=r"no tokenizer"):
        check_clip_folder(no_tokenizer)

    no_processor = _copy(clip_folder, tmp_path / "d")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(ClipFolderError, match=r"no preprocessor_config\.json"):
        check_clip_folder(no_processor)


def test_a_clip_of_another_text_width_than_the_base_is_refused(clip_folder):
    with pytest.raises(ClipFolderError, match=r"text width of 32, but the base model it is meant to score has 768"):
        ClipScorer.from_folder(clip_folder, expected_text_width=768)
    assert check_clip_folder(clip_folder, expected_text_width=32)["model_type"] == "clip"
