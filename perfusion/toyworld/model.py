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

Which text states the UNet reads is a property of the weights (their metadata's "text_states", written by
the pretraining that made them): "all" (77 states, as Stable Diffusion) or "words" (BOS and the words; the
EOS and the padding after it are zeros, see silence_after_words).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from perfusion.corpus import NEUTRAL_TEMPLATES
from perfusion.errors import BaseModelError
from perfusion.models import BuiltinBase, assemble_pipeline
from perfusion.toyworld.autoencoder import HaarAutoencoder
from perfusion.toyworld.checkpoint import read_metadata
from perfusion.toyworld.clip import TOY_CLIP_DIR, load_recipe, load_tower
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


TEXT_STATES = ("all", "words")


def silence_after_words(text_encoder: CLIPTextModel) -> CLIPTextModel:
    """Make `text_encoder`'s output zero from the first EOS on, so the UNet reads BOS and the words only
    (text_states "words"); it is marked `text_states = "words"`.

    Why: a causal encoder's EOS and its padding copies each summarise the whole prompt, and a UNet pretrained
    on all 77 states learns to read the prompt there (on the "all" toy, 78% of the cross-attention goes to the
    padding, ~6% to an object's word: benchmarks/attention_share.py). A concept's key-locked edit lives at
    its own token, so it reaches only that 6%. Zero states have zero keys and values (SD's to_k/to_v have no
    bias): each is an attention sink that adds nothing, the role SD's BOS plays. A forward hook, not a
    subclass: transformers maps checkpoint keys by the model class. Output (b, 77, d), as before."""

    def zero_from_eos(module, args, kwargs, output):  # type: ignore[no-untyped-def]
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        before_eos = ((ids == module.config.eos_token_id).int().cumsum(dim=1) == 0).unsqueeze(-1)  # (b, m, 1)
        output["last_hidden_state"] = output.last_hidden_state * before_eos.to(output.last_hidden_state.dtype)
        return output

    text_encoder.register_forward_hook(zero_from_eos, with_kwargs=True)
    text_encoder.text_states = "words"
    return text_encoder


def toy_text_encoder(clip_dir: Path = TOY_CLIP_DIR, text_states: str = "all") -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The toy CLIP's text tower, cut after the layer its recipe says the base reads (read_layer -2: the
    penultimate); its output is then final_layer_norm(hidden_states[read_layer]), as SD2's. `text_states`
    "words": zeros from the EOS on (silence_after_words)."""
    if text_states not in TEXT_STATES:
        raise BaseModelError(f"text_states must be one of {TEXT_STATES}, not {text_states!r}")
    if not (Path(clip_dir) / "config.json").is_file():
        raise BaseModelError(
            f"the toy CLIP is missing ({clip_dir}); pretrain it with `python -m perfusion.toyworld.clip`"
        )
    text_encoder = load_tower(CLIPTextModel, clip_dir)
    keep = text_encoder.config.num_hidden_layers + 1 + load_recipe(clip_dir).read_layer
    text_encoder.encoder.layers = text_encoder.encoder.layers[:keep]
    text_encoder.config.num_hidden_layers = keep
    if text_states == "words":
        silence_after_words(text_encoder)
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
    weights: Path | None = TOY_WEIGHTS, clip_dir: Path = TOY_CLIP_DIR, seed: int = 0, text_states: str | None = None
) -> StableDiffusionPipeline:
    """The toy pipeline; `weights=None` gives the random UNet pretraining starts from (on the trained CLIP).
    `text_states`: which states the UNet reads; None: what the weights were pretrained on ("all" without them)."""
    if weights is not None and not Path(weights).is_file():
        raise BaseModelError(
            f"the toy model's weights are missing ({weights}); pretrain them with "
            "`python -m perfusion.toyworld.pretrain` (see its docstring for the time it takes)"
        )
    if text_states is None:
        text_states = weights_text_states(weights) if weights is not None else "all"
    text_encoder, tokenizer = toy_text_encoder(clip_dir, text_states)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = toy_unet(text_encoder.config.hidden_size)
    if weights is not None:
        state = load_file(str(weights))
        unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    return assemble_pipeline(HaarAutoencoder(), text_encoder, tokenizer, unet, toy_scheduler())


def weights_text_states(weights: Path) -> str:
    """The text states these UNet weights were pretrained to read (their metadata; "all" when unsaid)."""
    text_states = read_metadata(Path(weights)).get("text_states", "all")
    if text_states not in TEXT_STATES:
        raise BaseModelError(
            f"{weights}: its metadata says text_states {text_states!r}, not one of {TEXT_STATES}; "
            "these weights were not written by `python -m perfusion.toyworld.pretrain`"
        )
    return text_states


if __name__ == "__main__":
    for path, text in language_files().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
