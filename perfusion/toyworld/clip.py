"""The toy CLIP: transformers' own CLIPModel, pretrained on the toy world, frozen under the toy base.

    python -m perfusion.toyworld.clip --minutes 40                  # writes perfusion/assets/toy-clip/
    python -m perfusion.toyworld.clip --minutes 40 --resume         # continue from the last checkpoint
    python -m perfusion.toyworld.clip --minutes 5 --out /tmp/probe --text-width 128 --token-loss none  # a probe

Stable Diffusion sits on a CLIP text encoder that was trained before the UNet ever saw it, and Perfusion
leans on what that gives: a word's encoding stays put across contexts, so the gate (eq. 3) opens at the
concept's token and nowhere else. The toy base gets the same: a CLIPModel (causal text transformer + a small
ViT) trained with the CLIP loss on toy-world scenes and captions of the rich caption language
(language.py), saved as a CLIP folder (`CLIPModel.from_pretrained(folder)` loads it, tokenizer included).

Contrastive training supervises only the pooled EOS state, so the per-position states the UNet reads get no
gradient of their own. Beside the CLIP loss, every position of the layer the base reads predicts its own
word through a linear head with a squared loss ("token loss"). Why squared: for the uncentered second
moment C of those states, s(e) = i^T C^-1 e / i^T C^-1 i (eq. 3) is, up to scale, the least-squares linear
probe for "this is the word of i" evaluated at e; a head that fits one-hot words under squared loss makes
that probe read ~1 at the word and ~0 elsewhere, which is the property the gate needs
(benchmarks/RESULTS.md has the probes that chose it).

Seeded, resumable (safetensors checkpoints, never pickle), with a progress bar.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
from transformers.utils import logging as hf_logging

from perfusion.toyworld.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from perfusion.toyworld.clip_objectives import AttributeTargets, ConsistencyLoss
from perfusion.toyworld.language import caption, caption_corpus, vocabulary
from perfusion.toyworld.world import MARKS, PALETTE, SHAPES, SIZE, TEXTURES, Scene, render, sample_scene
from perfusion.vocab import MAX_LENGTH, build_vocab, clip_tokenizer

T = TypeVar("T")

TOY_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-clip"
CHECKPOINT_MINUTES = 5.0
FULL_PADDING_RATE = 0.25  # batches padded to all 77 positions, so the padding states the UNet reads are trained


@dataclass(frozen=True)
class ClipRecipe:
    """What a toy CLIP is built and trained with (saved beside the weights as recipe.json)."""

    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    patch: int = 4  # 32 px images -> 8x8 patches
    projection: int = 128  # the shared image-text embedding space
    read_layer: int = -1  # the text layer the base's UNet reads: -1 the last, -2 the penultimate (SD2)
    token_loss: str = "mse"  # "mse" | "ce" | "none": the per-position objective (module docstring)
    token_weight: float = 1.0
    attribute_weight: float = 0.0  # >0: each noun's state also predicts its stated color and texture
    vision_weight: float = 0.0  # >0: the image embedding also predicts the scene (scene_labels)
    # >0: a noun's state is pulled to a running prototype of (word, stated color, stated texture), so it carries
    # its word and attributes and not the rest of its context (ConsistencyLoss)
    consistency_weight: float = 0.0
    batch: int = 128
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.token_loss not in ("mse", "ce", "none"):
            raise ValueError(f"token_loss must be mse, ce or none, not {self.token_loss!r}")
        if not -self.text_layers <= self.read_layer <= -1:
            raise ValueError(f"read_layer must be in -{self.text_layers}..-1, not {self.read_layer}")


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word of the caption language is one token."""
    texts = caption_corpus(3000) + vocabulary()
    return clip_tokenizer(*build_vocab(texts, vocab_size=8192))


def clip_config(recipe: ClipRecipe, tokenizer: CLIPTokenizer) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_width,
        intermediate_size=4 * recipe.text_width,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=recipe.projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_width,
        intermediate_size=4 * recipe.vision_width,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=recipe.patch,
        projection_dim=recipe.projection,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=recipe.projection)


def pixels_of(images: np.ndarray) -> torch.Tensor:
    """(b, 32, 32, 3) uint8 -> (b, 3, 32, 32) in [-1, 1]: the toy CLIP's input (its image processor's
    mean 0.5 and std 0.5 do the same to [0, 1] pixels)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def read_states(model: CLIPModel, input_ids: torch.Tensor, read_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position states of layer `read_layer` after the final layer norm (b, m, d), pooled EOS state (b, d)).
    With read_layer -1 these are CLIPTextModel's last_hidden_state and pooler_output."""
    text = model.text_model
    output = text(input_ids=input_ids, output_hidden_states=read_layer != -1)
    if read_layer == -1:
        return output.last_hidden_state, output.pooler_output
    return text.final_layer_norm(output.hidden_states[read_layer]), output.pooler_output


class ToyClipTrainer(nn.Module):
    """The CLIP model plus the training-only heads (never shipped)."""

    def __init__(self, recipe: ClipRecipe, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.recipe = recipe
        self.clip = CLIPModel(clip_config(recipe, tokenizer))
        # A freshly initialised LayerNorm (bias 0) puts every state on one hyperplane through the origin, so C
        # has a near-null direction (cond 1e9 with the rest at 1e4); a trained CLIP's bias does not. Start it
        # randomised and never decay it (see parameter_groups).
        final_norm = self.clip.text_model.final_layer_norm
        final_norm.bias.data = 0.2 * torch.randn_like(final_norm.bias)
        self.token_head = nn.Linear(recipe.text_width, len(tokenizer), bias=False)
        nn.init.zeros_(self.token_head.weight)  # predicts 0 at first: the squared loss starts at 1 per position
        self.color_head = nn.Linear(recipe.text_width, len(PALETTE) + 1)
        self.texture_head = nn.Linear(recipe.text_width, len(TEXTURES) + 1)
        self.attributes = AttributeTargets(tokenizer)
        self.scene_head = nn.Linear(recipe.projection, sum(n for _, n in SCENE_LABELS))
        self.consistency = ConsistencyLoss(len(tokenizer), recipe.text_width)

    def parameter_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """AdamW groups: no decay on norms, biases and embeddings (the usual transformer recipe)."""
        decayed: list[nn.Parameter] = []
        kept: list[nn.Parameter] = []
        for name, parameter in self.named_parameters():
            no_decay = parameter.ndim < 2 or "norm" in name or "embedding" in name
            (kept if no_decay else decayed).append(parameter)
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]

    def losses(self, pixels: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CLIP loss and the enabled auxiliary ones. pixels (b, 3, 32, 32), input_ids (b, m), labels (b, 9)."""
        states, pooled = read_states(self.clip, input_ids, self.recipe.read_layer)
        text_embeds = F.normalize(self.clip.text_projection(pooled), dim=-1)  # (b, p)
        image_features = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)
        image_embeds = F.normalize(image_features, dim=-1)  # (b, p)
        logits = self.clip.logit_scale.exp().clamp(max=100) * text_embeds @ image_embeds.T  # (b, b)
        matches = torch.arange(len(logits), device=logits.device)  # caption k describes image k
        losses = {"clip": (F.cross_entropy(logits, matches) + F.cross_entropy(logits.T, matches)) / 2}
        if self.recipe.token_loss != "none":
            predicted = self.token_head(states)  # (b, m, V)
            if self.recipe.token_loss == "mse":  # squared error against the one-hot word, summed over the vocabulary
                target = F.one_hot(input_ids, predicted.shape[-1]).to(predicted.dtype)
                losses["token"] = (predicted - target).square().sum(-1).mean()
            else:
                losses["token"] = F.cross_entropy(predicted.flatten(0, 1), input_ids.flatten())
        if self.recipe.attribute_weight > 0 or self.recipe.consistency_weight > 0:
            colors, textures = (t.to(states.device) for t in self.attributes(input_ids.cpu()))
        if self.recipe.attribute_weight > 0:
            losses["attribute"] = F.cross_entropy(
                self.color_head(states).flatten(0, 1), colors.flatten()
            ) + F.cross_entropy(self.texture_head(states).flatten(0, 1), textures.flatten())
        if self.recipe.consistency_weight > 0:
            losses["consistency"] = self.consistency(states, input_ids, colors, textures)
        if self.recipe.vision_weight > 0:
            logits_per_label = torch.split(self.scene_head(image_features), [n for _, n in SCENE_LABELS], dim=-1)
            losses["vision"] = sum(
                (F.cross_entropy(logits, labels[:, k]) for k, logits in enumerate(logits_per_label)),
                torch.zeros((), device=pixels.device),
            )
        return losses


SCENE_LABELS = (  # (name, classes) of the vision head's targets: two object slots (left/only, right) + background
    *((f"{slot} {attribute}", len(values) + 1) for slot in ("first", "second")
      for attribute, values in (("shape", SHAPES), ("color", PALETTE), ("texture", TEXTURES), ("mark", MARKS))),
    ("background", len(PALETTE)),
)  # fmt: skip


def scene_labels(scenes: list[Scene]) -> torch.Tensor:
    """(b, 9) class indices per SCENE_LABELS; an absent second object is the last class of each of its heads."""
    rows = []
    for scene in scenes:
        row = []
        for slot in range(2):
            obj = scene.objects[slot] if slot < len(scene.objects) else None
            for attribute, values in (
                ("shape", SHAPES),
                ("color", tuple(PALETTE)),
                ("texture", TEXTURES),
                ("mark", MARKS),
            ):
                row.append(len(values) if obj is None else values.index(getattr(obj, attribute)))
        rows.append([*row, list(PALETTE).index(scene.background)])
    return torch.tensor(rows)


def batch_of(
    rng: random.Random, size: int, tokenizer: CLIPTokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels (b, 3, 32, 32), input_ids (b, m), scene labels (b, 9)) of random pretraining scenes and captions;
    m is the longest caption, or all 77 positions in FULL_PADDING_RATE of the batches."""
    scenes = [sample_scene(rng) for _ in range(size)]
    pixels = pixels_of(np.stack([render(scene) for scene in scenes]))
    padding = "max_length" if rng.random() < FULL_PADDING_RATE else "longest"
    ids = tokenizer(
        [caption(scene, rng) for scene in scenes],
        padding=padding,
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pixels, ids, scene_labels(scenes)


def pretrain(
    out_dir: Path, recipe: ClipRecipe, minutes: float, steps: int | None, resume: bool, device: str
) -> dict[str, object]:
    """Train until the time budget or the step count; write the CLIP folder (fp16 weights) into `out_dir`."""
    tokenizer = build_tokenizer()
    torch.manual_seed(recipe.seed)
    trainer = ToyClipTrainer(recipe, tokenizer).to(device)
    optimizer = torch.optim.AdamW(trainer.parameter_groups(0.05), lr=recipe.lr)
    rng = random.Random(recipe.seed)
    step, spent = 0, 0.0
    checkpoint = out_dir / "checkpoint.safetensors"
    if resume and checkpoint.is_file():
        step, spent, rng = _resume(checkpoint, trainer, optimizer, recipe)
    budget = minutes * 60
    started, last_save = time.perf_counter() - spent, time.perf_counter()

    def done() -> float:
        return step / steps if steps else (time.perf_counter() - started) / budget

    progress = tqdm(
        total=steps or int(budget),
        unit="step" if steps else "s",
        desc="pretraining toy CLIP",
        initial=step if steps else int(spent),
    )
    history: dict[str, list[float]] = {}
    while done() < 1:
        for group in optimizer.param_groups:  # warm-up, then cosine decay to 10% over the run
            group["lr"] = (
                recipe.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done()))))
            )
        pixels, ids, labels = batch_of(rng, recipe.batch, tokenizer)
        losses = trainer.losses(pixels.to(device), ids.to(device), labels.to(device))
        loss = losses["clip"] + recipe.token_weight * losses.get("token", torch.zeros((), device=device))
        loss = loss + recipe.attribute_weight * losses.get("attribute", torch.zeros((), device=device))
        loss = loss + recipe.vision_weight * losses.get("vision", torch.zeros((), device=device))
        loss = loss + recipe.consistency_weight * losses.get("consistency", torch.zeros((), device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        step += 1
        for name, value in losses.items():
            history.setdefault(name, []).append(value.item())
        progress.n = step if steps else int(time.perf_counter() - started)
        progress.set_postfix({name: f"{np.mean(values[-50:]):.3f}" for name, values in history.items()})
        if time.perf_counter() - last_save > CHECKPOINT_MINUTES * 60:
            _save(checkpoint, trainer, optimizer, recipe, step, time.perf_counter() - started, rng)
            last_save = time.perf_counter()
    progress.close()
    _save(checkpoint, trainer, optimizer, recipe, step, time.perf_counter() - started, rng)
    save_toy_clip(trainer.clip, tokenizer, recipe, out_dir)
    summary: dict[str, object] = {
        "steps": step,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "device": device,
        **{f"final_{name}_loss": float(np.mean(values[-100:])) for name, values in history.items()},
        "recipe": asdict(recipe),
    }
    (out_dir / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_toy_clip(model: CLIPModel, tokenizer: CLIPTokenizer, recipe: ClipRecipe, out_dir: Path) -> None:
    """A CLIP folder: config.json + model.safetensors (fp16), the tokenizer, an image processor config, and
    recipe.json (which text layer the base reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out_dir)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": SIZE},
        "do_center_crop": True,
        "crop_size": {"height": SIZE, "width": SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "resample": 0,  # nearest: the toy world's hard edges
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (out_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")


def load_tower(tower_class: type[T], folder: Path) -> T:
    """One tower of the CLIP folder (CLIPTextModel or CLIPVisionModel), fp32. The other tower's weights are
    "unexpected" for it by design, so transformers' load report is silenced here rather than printed."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a few MB load in milliseconds: a bar is noise in every log
    try:
        return tower_class.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)  # type: ignore[attr-defined]
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_recipe(folder: Path) -> ClipRecipe:
    data = json.loads((Path(folder) / "recipe.json").read_text())
    return ClipRecipe(**{f.name: data[f.name] for f in fields(ClipRecipe) if f.name in data})


def _save(path: Path, trainer, optimizer, recipe, step: int, elapsed: float, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    tensors = {f"model.{k}": v for k, v in trainer.state_dict().items()}
    save_checkpoint(path, tensors, optimizer, step, elapsed, rng, metadata={"recipe": json.dumps(asdict(recipe))})


def _resume(path: Path, trainer, optimizer, recipe) -> tuple[int, float, random.Random]:  # type: ignore[no-untyped-def]
    saved_recipe = read_metadata(path).get("recipe", "{}")
    if json.loads(saved_recipe) != asdict(recipe):
        raise ValueError(f"{path} was trained with another recipe: {saved_recipe}; resume with the same flags")
    saved = load_checkpoint(path, optimizer)
    trainer.load_state_dict({k[len("model.") :]: v for k, v in saved.tensors.items() if k.startswith("model.")})
    return saved.step, saved.elapsed, saved.rng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=TOY_CLIP_DIR)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    for field in fields(ClipRecipe):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    recipe = ClipRecipe(**{f.name: getattr(args, f.name) for f in fields(ClipRecipe)})
    summary = pretrain(args.out, recipe, args.minutes, args.steps, args.resume, args.device)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
