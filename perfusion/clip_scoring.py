"""CLIP-I and CLIP-T, the paper's quality measures (Perfusion sec. 5; Gal et al. 2022), from any local CLIP.

    scorer = ClipScorer.from_folder("perfusion/assets/toy-clip")     # or a real CLIP, e.g. clip-vit-large-patch14
    scorer.image_similarity(renders, training_images)                 # CLIP-I
    scorer.text_similarity(renders, ["a photo of a star on a blue background", ...])   # CLIP-T

- CLIP-I (fidelity): the mean cosine similarity between the CLIP image embeddings of each render and each
  of the concept's training images.
- CLIP-T (text alignment): the mean cosine similarity between each render's image embedding and the text
  embedding of its prompt with every concept token replaced by its superclass word (the paper's protocol:
  the CLIP text encoder has never seen the concept token).

A folder is checked before anything loads (ClipFolderError names the folder and what is wrong): it must hold a
CLIPModel config, safetensors weights (never pickle), a tokenizer and an image-processor config, and, when
the scorer is meant for a base model, a text width equal to that base's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from perfusion.errors import PerfusionError

ImageLike = Image.Image | np.ndarray  # PIL, or (h, w, 3) uint8 / float in [0, 1]


class ClipFolderError(PerfusionError):
    """A folder meant to hold a CLIP model does not."""


def check_clip_folder(folder: str | os.PathLike[str], expected_text_width: int | None = None) -> dict[str, object]:
    """The folder's config.json if it is a usable CLIP folder; ClipFolderError otherwise (see module docstring)."""
    path = Path(folder)
    if not path.is_dir():
        raise ClipFolderError(f"CLIP folder {path} does not exist or is not a folder: pass a local CLIP model folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ClipFolderError(f"CLIP folder {path} has no config.json: pass the folder that save_pretrained wrote")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ClipFolderError(f"CLIP folder {path}: config.json is not readable JSON ({error})") from error
    model_type = config.get("model_type")
    if model_type != "clip" or "text_config" not in config or "vision_config" not in config:
        raise ClipFolderError(
            f"CLIP folder {path} holds a {model_type!r} config, not a CLIPModel's (model_type 'clip' with a "
            "text and a vision config): a text encoder alone cannot score images; pass a full CLIP model folder"
        )
    weights = list(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = f" ({', '.join(pickled)} are pickle files, never loaded: convert them to safetensors)" if pickled else ""
        raise ClipFolderError(f"CLIP folder {path} has no .safetensors weights{hint}")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise ClipFolderError(f"CLIP folder {path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if not (path / "preprocessor_config.json").is_file():
        raise ClipFolderError(f"CLIP folder {path} has no preprocessor_config.json (the image size, mean and std)")
    text_width = int(config["text_config"].get("hidden_size", 512))
    if expected_text_width is not None and text_width != expected_text_width:
        raise ClipFolderError(
            f"CLIP folder {path} has a text width of {text_width}, but the base model it is meant to score has "
            f"{expected_text_width}: pass the CLIP the base was built on"
        )
    return dict(config)


class ClipScorer:
    """CLIP-I and CLIP-T with one CLIPModel (module docstring)."""

    def __init__(
        self, model: CLIPModel, tokenizer: CLIPTokenizer, processor: dict[str, Any], device: str = "cpu"
    ) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        size = processor.get("crop_size") or processor.get("size") or 224  # {"height": h, ...}, {"shortest_edge": s}, s
        self.image_size = (
            int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) else int(size)
        )
        self.mean = torch.tensor(processor.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)
        self.resample = Image.Resampling(int(processor.get("resample", 3)))
        self.device = device

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], device: str = "cpu", expected_text_width: int | None = None
    ) -> ClipScorer:
        check_clip_folder(folder, expected_text_width)
        try:
            model = CLIPModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=True, local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ClipFolderError(f"could not load the CLIP folder {folder}: {error}") from error
        processor = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        return cls(model, tokenizer, processor, device)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """(n, p) unit-norm image embeddings. Images are resized (shorter side) and center-cropped to the
        processor's size, then normalised with its mean and std."""
        pixels = torch.stack([self._pixels(image) for image in images])
        pixels = ((pixels - self.mean) / self.std).to(self.device)
        output = self.model.vision_model(pixel_values=pixels)
        return F.normalize(self.model.visual_projection(output.pooler_output).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, p) unit-norm text embeddings (each text cut to the tokenizer's length, 77 for CLIP)."""
        ids = self.tokenizer(
            list(texts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        output = self.model.text_model(input_ids=ids.to(self.device))
        return F.normalize(self.model.text_projection(output.pooler_output).float(), dim=-1).cpu()

    def image_similarity(self, renders: Sequence[ImageLike], references: Sequence[ImageLike]) -> float:
        """CLIP-I: mean cosine over every (render, reference) pair."""
        if not renders or not references:
            raise ValueError("CLIP-I needs at least one render and one reference image")
        return float((self.image_embeddings(renders) @ self.image_embeddings(references).T).mean())

    def text_similarity(self, renders: Sequence[ImageLike], prompts: Sequence[str]) -> float:
        """CLIP-T: mean cosine between each render and its prompt (concept tokens already replaced by their
        superclass words: see superclass_prompt)."""
        if len(renders) != len(prompts) or not renders:
            raise ValueError(f"CLIP-T needs one prompt per render (got {len(renders)} renders, {len(prompts)} prompts)")
        return float((self.image_embeddings(renders) * self.text_embeddings(prompts)).sum(-1).mean())

    def _pixels(self, image: ImageLike) -> torch.Tensor:
        """(3, s, s) in [0, 1]."""
        if isinstance(image, np.ndarray):
            array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            image = Image.fromarray(array)
        picture = image.convert("RGB")
        scale = self.image_size / min(picture.size)
        picture = picture.resize(
            (max(self.image_size, round(picture.width * scale)), max(self.image_size, round(picture.height * scale))),
            self.resample,
        )
        left, top = (picture.width - self.image_size) // 2, (picture.height - self.image_size) // 2
        picture = picture.crop((left, top, left + self.image_size, top + self.image_size))
        return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)


def superclass_prompt(prompt: str, superclasses: dict[str, str]) -> str:
    """The prompt with each concept token replaced by its superclass word (the paper's CLIP-T protocol):
    superclass_prompt("<mug> on a table", {"<mug>": "mug"}) == "mug on a table"."""
    for token, word in superclasses.items():
        prompt = prompt.replace(token, word)
    return prompt
