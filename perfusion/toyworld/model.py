"""The "toy" base model (v4): built the way Stable Diffusion is built, on a frozen toy CLIP.

    text encoder  the toy CLIP's text tower (clip.py), frozen, cut after the layer its recipe reads (as SD2
                  ships OpenCLIP's text tower without its last layer), final layer norm kept
    tokenizer     the toy CLIP's: every word of the caption language is one token
    UNet          UNet2DConditionModel (64, 128, 192) on 16x16x12 latents; cross-attention at 16x16, 8x8 and
                  the 4x4 mid block, width = the CLIP text width
    autoencoder   exact orthonormal 2x2 Haar wavelet transform (autoencoder.py)
    scheduler     DDIM over a cosine (squaredcos_cap_v2) schedule, v-prediction

Why cross-attention at 16x16: in v3 (8x8 and 4x4 only) an object of a two-object scene covered about 2x2
cells of the finest map that reads the prompt, too few to give each object its own words.
The UNet is pretrained by `python -m perfusion.toyworld.pretrain` and shipped as
perfusion/assets/toy/toy.safetensors (fp16 EMA weights, UNet only: the text encoder is the CLIP folder's).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from perfusion.corpus import NEUTRAL_TEMPLATES
from perfusion.errors import BaseModelError
from perfusion.models import BuiltinBase, assemble_pipeline
from perfusion.toyworld.autoencoder import HaarAutoencoder
from perfusion.toyworld.clip import TOY_CLIP_DIR, load_recipe
from perfusion.toyworld.language import caption_corpus, vocabulary

TOY_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"
TOY_WEIGHTS = TOY_DIR / "toy.safetensors"
TEMPLATES_FILE = TOY_DIR / "templates.txt"  # the contexts concepts are trained in, one a line ("{}": the token)
CAPTIONS_FILE = TOY_DIR / "captions.txt"  # the covariance corpus, one caption a line


def build_toy_base() -> BuiltinBase:
    """The shipped toy model with its own language (`python -m perfusion.toyworld.model` writes the files)."""
    return BuiltinBase(build_toy_pipeline(), read_lines(TEMPLATES_FILE), CAPTIONS_FILE)


def read_lines(path: Path) -> tuple[str, ...]:
    return tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)


def toy_templates() -> tuple[str, ...]:
    """CLIP's ImageNet-style templates (corpus.NEUTRAL_TEMPLATES) that the caption language can say, plus the
    token alone and after "a" (where catalog prompts put it: "<product> on a white background")."""
    known = set(vocabulary())
    spoken = [t for t in NEUTRAL_TEMPLATES if set(t.replace("{}", " ").split()) <= known]
    return ("{}", "a {}", *spoken)


def language_files() -> dict[Path, str]:
    """What the toy's language files hold, generated from the caption language (a test checks the shipped ones)."""
    return {
        TEMPLATES_FILE: "\n".join(toy_templates()) + "\n",
        CAPTIONS_FILE: "\n".join(caption_corpus()) + "\n",
    }


def toy_text_encoder(clip_dir: Path = TOY_CLIP_DIR) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The toy CLIP's text tower, cut after the layer its recipe says the base reads (read_layer -2: the
    penultimate); its output is then final_layer_norm(hidden_states[read_layer]), as SD2's."""
    if not (Path(clip_dir) / "config.json").is_file():
        raise BaseModelError(
            f"the toy CLIP is missing ({clip_dir}); pretrain it with `python -m perfusion.toyworld.clip`"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the folder's vision tower is "unexpected" for a text model: by design
    try:
        text_encoder = CLIPTextModel.from_pretrained(clip_dir, dtype=torch.float32, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    keep = text_encoder.config.num_hidden_layers + 1 + load_recipe(clip_dir).read_layer
    text_encoder.encoder.layers = text_encoder.encoder.layers[:keep]
    text_encoder.config.num_hidden_layers = keep
    return text_encoder, CLIPTokenizer.from_pretrained(clip_dir)


def toy_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=12,
        out_channels=12,
        block_out_channels=(64, 128, 192),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def toy_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        # Sampling starts at the last training timestep (Lin et al. 2024, "Common diffusion noise schedules
        # and sample steps are flawed"): the toy world's flat backgrounds are the image mean, which a first
        # step that leaks signal would fix before the prompt has a say.
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )


def build_toy_pipeline(
    weights: Path | None = TOY_WEIGHTS, clip_dir: Path = TOY_CLIP_DIR, seed: int = 0
) -> StableDiffusionPipeline:
    """The toy pipeline; `weights=None` gives the random UNet pretraining starts from (on the trained CLIP)."""
    text_encoder, tokenizer = toy_text_encoder(clip_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = toy_unet(text_encoder.config.hidden_size)
    if weights is not None:
        if not Path(weights).is_file():
            raise BaseModelError(
                f"the toy model's weights are missing ({weights}); pretrain them with "
                "`python -m perfusion.toyworld.pretrain` (see its docstring for the time it takes)"
            )
        state = load_file(str(weights))
        unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    return assemble_pipeline(HaarAutoencoder(), text_encoder, tokenizer, unet, toy_scheduler())


if __name__ == "__main__":
    for path, text in language_files().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
