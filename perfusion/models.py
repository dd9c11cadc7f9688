"""Base models: what a concept is trained on and rendered with.

`load_base(spec)` accepts
- a built-in base by name (perfusion.registry.BUILTIN_BASES, the one place they are registered):
  "toy": the project's own model pretrained on the toy world (perfusion/toyworld), weights shipped;
  "tiny": a small Stable-Diffusion-shaped pipeline built from config with a fixed seed (random weights,
  for unit tests; builds in well under a second on CPU), with the project's generated BPE tokenizer;
- a local diffusers folder (SD 1.x / 2.x; has model_index.json);
- a local single-file checkpoint (.safetensors; pass `config=` a diffusers folder of the same architecture,
  since the architecture config otherwise comes from the Hub);
- a Hub id ("org/name"): found in the local Hugging Face cache, or fetched only when the Hub answers;
  otherwise it fails fast and asks for a local path. Nothing is ever downloaded at import time.

A base carries its own language: the templates a concept is trained in and the caption corpus its covariance
C is estimated from. A real text encoder gets the generic ones (corpus.py); a built-in base may bring its own
(the toy's are files beside its weights, in the only words its encoder knows).

The fingerprint identifies what a concept depends on: the text encoder (its weights and the tokenizer's
vocabulary) and every cross-attention K/V projection with the layer names. Weights are hashed as float16
bytes so the same model loaded in fp32 on CPU and fp16 on GPU has one fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig, CLIPTextModel

from perfusion.corpus import NEUTRAL_TEMPLATES, builtin_prompts, read_caption_file
from perfusion.errors import BaseModelError
from perfusion.registry import BUILTIN_BASES, resolve
from perfusion.vocab import load_tiny_tokenizer

TINY_SEED = 0


@dataclass
class BaseModel:
    """A loaded diffusers pipeline plus the identity of its weights and its own language."""

    pipeline: StableDiffusionPipeline  # or an mmdit.MMDiTPipeline (see `architecture`)
    source: str  # what the user asked for: "tiny", a path, or a Hub id
    fingerprint: str
    templates: tuple[str, ...] = NEUTRAL_TEMPLATES  # contexts a concept is trained in; "{}" is the token
    captions_file: Path | None = None  # the covariance corpus, one caption a line; None: corpus.builtin_prompts()
    image_prompt: Any = None  # an MM-DiT's zero_shot.ImagePromptKit (its DynaIP adapter), if it has one
    image_prompt_hint: str = ""  # why it has none, and the fix

    def captions(self) -> list[str]:
        """Captions typical of what this base's text encoder reads: the covariance C's corpus."""
        return builtin_prompts() if self.captions_file is None else read_caption_file(str(self.captions_file))

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.pipeline.tokenizer

    @property
    def architecture(self) -> str:
        """ "unet" (Stable Diffusion 1.x/2.x shaped) or "mmdit" (SD3 shaped, mmdit.MMDiTPipeline)."""
        return "mmdit" if hasattr(self.pipeline, "transformer") else "unet"

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.pipeline.text_encoder

    @property
    def unet(self) -> UNet2DConditionModel:
        if self.architecture != "unet":
            raise BaseModelError(
                f"base {self.source!r} is an MM-DiT (no UNet): Perfusion and Personalized Residuals concepts need "
                "a Stable Diffusion 1.x/2.x base; render this base's products with method zero-shot"
            )
        return self.pipeline.unet

    @property
    def denoiser(self) -> ModelMixin:
        """The UNet or the MM-DiT transformer."""
        return self.pipeline.transformer if self.architecture == "mmdit" else self.pipeline.unet

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def resolution(self) -> int:
        """Native image size in pixels (latent size x VAE factor)."""
        return int(self.denoiser.config.sample_size * self.pipeline.vae_scale_factor)

    @property
    def resolution_step(self) -> int:
        """Image sizes this base can sample are multiples of this: the VAE factor x the UNet's total
        downsampling (2 per down block but the last), or x the MM-DiT's patch size."""
        config = self.denoiser.config
        if self.architecture == "mmdit":
            return int(self.pipeline.vae_scale_factor * config.patch_size)
        return int(self.pipeline.vae_scale_factor * 2 ** (len(config.down_block_types) - 1))

    def resolution_problem(self, resolution: int) -> str | None:
        """What is wrong with sampling or training this base at `resolution` pixels, or None."""
        from perfusion.config import resolution_problem

        return resolution_problem(resolution, self.resolution_step)

    def cross_attention_layers(self) -> dict[str, Attention]:
        return cross_attention_layers(self.pipeline.unet)


@dataclass(frozen=True)
class BuiltinBase:
    """What a built-in base's builder returns (see BUILTIN_BASES)."""

    pipeline: StableDiffusionPipeline
    templates: tuple[str, ...] = NEUTRAL_TEMPLATES
    captions_file: Path | None = None
    image_prompt: Any = None  # zero_shot.ImagePromptKit, built on this pipeline's transformer
    image_prompt_hint: str = "Zero-shot products need an MM-DiT base with a DynaIP adapter (toy-mmdit)."


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """Every cross-attention module (diffusers names them attn2), by module path, in UNet order."""
    return {
        name: module
        for name, module in unet.named_modules()
        if name.endswith("attn2") and isinstance(module, Attention) and module.is_cross_attention
    }


def load_base(
    spec: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: str | os.PathLike[str] | None = None,
) -> BaseModel:
    """Load a base model by name, local path or Hub id (see the module docstring)."""
    spec = str(spec)
    # Load at the stored precision and fingerprint BEFORE casting: hashing fp16 bytes makes fp32 and fp16
    # loads agree, but a bf16 cast drops mantissa bits first and would change the identity.
    if spec in BUILTIN_BASES:
        built: BuiltinBase = resolve(BUILTIN_BASES[spec])()
    elif os.path.isdir(spec):
        built = BuiltinBase(_load_folder(spec))
    elif os.path.isfile(spec):
        built = BuiltinBase(_load_single_file(spec, config))
    elif _looks_like_hub_id(spec):
        built = BuiltinBase(_load_hub(spec))
    else:
        names = ", ".join(repr(name) for name in BUILTIN_BASES)
        raise BaseModelError(
            f"base model {spec!r} not found: pass a built-in base ({names}), a local diffusers folder (with "
            "model_index.json), a local .safetensors checkpoint, or a Hugging Face Hub id such as 'org/name'."
        )
    pipeline = built.pipeline
    pipeline.set_progress_bar_config(disable=True)
    identity = fingerprint(pipeline)
    kit = built.image_prompt
    if kit is not None:  # a zero-shot concept depends on the adapter and vision tower too
        from perfusion.zero_shot import with_kit_fingerprint

        identity = with_kit_fingerprint(identity, kit)
    # diffusers warns on every dtype cast of a model whose keep-in-fp32 list is empty ("[]"): nothing to see.
    modeling_logger = logging.getLogger("diffusers.models.modeling_utils")
    level = modeling_logger.level
    modeling_logger.setLevel(logging.ERROR)
    try:
        denoiser = pipeline.transformer if hasattr(pipeline, "transformer") else pipeline.unet
        for module in (denoiser, pipeline.text_encoder, pipeline.vae, *(kit.modules() if kit else ())):
            module.requires_grad_(False)
            module.eval()
            module.to(device=device, dtype=dtype)
    finally:
        modeling_logger.setLevel(level)
    return BaseModel(
        pipeline, spec, identity, built.templates, built.captions_file, kit, "" if kit else built.image_prompt_hint
    )


def build_tiny_base() -> BuiltinBase:
    return BuiltinBase(build_tiny_pipeline())


def build_tiny_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """SD-shaped and small: 32x32 images, 16x16x4 latents, 7 cross-attention layers, text dim 32."""
    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=32, intermediate=64, layers=2, heads=4))
        # A freshly initialised LayerNorm (gamma 1, beta 0) makes every encoding sum to zero, so C would be
        # singular; a trained encoder's learned affine does not. Randomise it like a trained one.
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        final_norm.weight.data = 1.0 + 0.2 * torch.randn_like(final_norm.weight)
        final_norm.bias.data = 0.2 * torch.randn_like(final_norm.bias)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = tiny_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def tiny_vae() -> AutoencoderKL:
    """The tiny bases' autoencoder: 32x32 images <-> 16x16x4 latents (random weights; seed it first)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def clip_text_config(tokenizer: Any, hidden: int, intermediate: int, layers: int, heads: int) -> CLIPTextConfig:
    """A CLIP text encoder config for `tokenizer`'s vocabulary, 77 positions like CLIP."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def assemble_pipeline(
    vae: Any, text_encoder: CLIPTextModel, tokenizer: Any, unet: UNet2DConditionModel, scheduler: Any
) -> StableDiffusionPipeline:
    """The stock StableDiffusionPipeline around our components (no safety checker: not an SD checkpoint)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def fingerprint(pipeline: StableDiffusionPipeline) -> str:
    """sha256 (first 32 hex digits) of everything a concept depends on; see the module docstring."""
    digest = hashlib.sha256()
    # Only the base vocabulary: concept tokens added later must not change the identity.
    base_size = pipeline.tokenizer.vocab_size
    vocab = sorted((word, index) for word, index in pipeline.tokenizer.get_vocab().items() if index < base_size)
    digest.update(json.dumps(vocab).encode())
    for name, tensor in sorted(pipeline.text_encoder.state_dict().items()):
        _hash_tensor(digest, name, tensor)
    # An encoder marked with text_states (the toy's "words": states zeroed from the EOS on) encodes otherwise
    # with the same weights; unmarked encoders keep the fingerprints they always had.
    if getattr(pipeline.text_encoder, "text_states", None):
        digest.update(f"text_states={pipeline.text_encoder.text_states}".encode())
    if hasattr(pipeline, "transformer"):  # an MM-DiT: an image-prompt adapter depends on every weight of it
        for name, tensor in sorted(pipeline.transformer.state_dict().items()):
            if ".processor." not in name:  # an installed adapter's weights (dynaip.py) are not the base's
                _hash_tensor(digest, f"transformer.{name}", tensor)
        return digest.hexdigest()[:32]
    for name, layer in cross_attention_layers(pipeline.unet).items():
        _hash_tensor(digest, f"{name}.to_k", layer.to_k.weight)
        _hash_tensor(digest, f"{name}.to_v", layer.to_v.weight)
    digest.update(str(pipeline.unet.config.cross_attention_dim).encode())
    return digest.hexdigest()[:32]


def _hash_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    if name.endswith("concept_vectors") or name.endswith("position_ids"):
        return  # added concept rows, and a non-persistent index buffer
    digest.update(name.encode())
    digest.update(str(tuple(tensor.shape)).encode())
    half = tensor.detach().to("cpu", torch.float16).contiguous()
    digest.update(half.view(torch.uint8).numpy().tobytes())


def _load_folder(path: str) -> StableDiffusionPipeline:
    if not (Path(path) / "model_index.json").is_file():
        raise BaseModelError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json). Pass the folder that "
            "holds model_index.json, unet/, text_encoder/, tokenizer/, vae/ and scheduler/."
        )
    try:
        return StableDiffusionPipeline.from_pretrained(
            path,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError) as error:
        raise BaseModelError(f"could not load the diffusers folder {path}: {error}") from error


def _load_single_file(path: str, config: str | os.PathLike[str] | None) -> StableDiffusionPipeline:
    if not path.endswith(".safetensors"):
        raise BaseModelError(
            f"{path}: only .safetensors checkpoints are loaded (pickle-based .ckpt/.bin files can run "
            "arbitrary code). Convert it to safetensors first."
        )
    try:
        return StableDiffusionPipeline.from_single_file(
            path,
            config=str(config) if config is not None else None,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as error:  # diffusers raises many types here; all mean "cannot load this file"
        hint = (
            ""
            if config is not None
            else " A single-file checkpoint needs its architecture config: pass config=<a local diffusers "
            "folder of the same architecture> to load_base, or convert it once to a diffusers folder "
            "(save_pretrained) and name that folder (a manifest's base_model)."
        )
        raise BaseModelError(f"could not load the checkpoint {path}: {error}.{hint}") from error


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _load_hub(repo_id: str) -> StableDiffusionPipeline:
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    try:  # the local Hugging Face cache first: no network needed
        return StableDiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise BaseModelError(
            f"base model {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached. "
            f"Download it where you have network (e.g. `hf download {repo_id} --local-dir DIR`) and pass the "
            "local folder instead."
        )
    try:
        return StableDiffusionPipeline.from_pretrained(repo_id, **kwargs)
    except (OSError, ValueError) as error:
        raise BaseModelError(f"could not load {repo_id!r} from the Hub: {error}") from error


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub endpoint: fail in seconds rather than after long HTTP retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
