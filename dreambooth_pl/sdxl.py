"""Load SDXL base parts (hub id or local folder), encode prompts with both text encoders, build add_time_ids."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

# dtype names in configs and on command lines (vae_dtype, sample --dtype, export --dtype)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype``'s name as configs spell it (:data:`DTYPES`' key; ``float8_e4m3fn`` and the like for others)."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def has_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively, as torch reports for the current GPU (NVIDIA Ampere and newer; a T4
    only emulates it, slowly)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def vae_dtype_on(name: str, device: torch.device | None) -> torch.dtype:
    """The VAE's dtype for ``model.vae_dtype`` ``name`` on ``device``: ``auto`` is bf16 where the GPU has it (fp32's
    range, so SDXL's VAE cannot overflow as in fp16; tensor cores), else fp32 (a T4, the CPU)."""
    if name == "auto":
        return torch.bfloat16 if device is not None and has_bf16(torch.device(device)) else torch.float32
    return DTYPES[name]


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says how to fix it."""


class RandomBaseWarning(UserWarning):
    """The base being loaded has random weights (built by make-base or ``model.random_base``)."""


_WARNED_RANDOM: set[str] = set()


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that does not start with ``.``, ``/`` or ``~``: what :func:`resolve_base` may fetch from the hub."""
    return not str(name).startswith((".", "/", "~")) and str(name).count("/") == 1


def random_base_preset(folder: str | os.PathLike) -> str | None:
    """The preset of a random-weight base this project built at ``folder`` (``tiny``/``sdxl``), else None."""
    from .io import owner_info

    info = owner_info(folder) or {}
    return info.get("preset", "unknown preset") if info.get("kind") == "random-base" else None


def resolve_base(name: str) -> str:
    """Return a local folder for ``name`` (a local path, or a hub id already cached or downloadable).

    Args:
        name: local pipeline folder or hub id such as ``stabilityai/stable-diffusion-xl-base-1.0``.
    Fails within seconds, naming the id, when the hub cannot be reached, instead of retrying for minutes.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise BaseModelError(f"base folder {str(path)!r} has no model_index.json or unet/: point "
                                 "model.base_model at a diffusers SDXL pipeline folder (python -m dreambooth_pl "
                                 "make-base writes a random one).")
        if looks_like_hub_id(name):
            warnings.warn(f"base {name!r} is read from the local folder {str(path.resolve())!r}, not from the "
                          f"Hugging Face hub (write ./{name} to say so, or run from another folder).", stacklevel=2)
        preset = random_base_preset(path)
        if preset and str(path.resolve()) not in _WARNED_RANDOM:  # once per base and process: every loader asks
            _WARNED_RANDOM.add(str(path.resolve()))
            warnings.warn(f"base {name!r} has RANDOM weights (a make-base {preset} stand-in for tests and speed "
                          "runs): its images are noise.", RandomBaseWarning, stacklevel=2)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise BaseModelError(f"base model {name!r} is neither an existing folder nor a hub id (owner/name).")
    import huggingface_hub as hf

    try:  # a copy already in the local hub cache needs no network
        return hf.snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    fix = (f"Download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) and set "
           "model.base_model to DIR, or build a random stand-in with python -m dreambooth_pl make-base.")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise BaseModelError(f"base model {name!r} is not cached locally and the Hugging Face hub is unreachable "
                             f"(HF_HUB_OFFLINE is set). {fix}")
    try:
        # huggingface_hub reads its timeout variables at import, so pass short timeouts explicitly: an
        # unreachable hub then fails in seconds instead of a minute of retries
        hf.HfApi().model_info(name, timeout=5)
        return hf.snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                    ignore_patterns=["*.fp16.safetensors", "*refiner*", "*.bin"], etag_timeout=5)
    except Exception as e:  # hub unreachable, unknown id, gated repo
        raise BaseModelError(f"could not download base model {name!r}: the Hugging Face hub is unreachable or "
                             f"refused it ({type(e).__name__}: {str(e).splitlines()[0][:200]}). {fix}") from None


@dataclass
class SDXLParts:
    """The frozen pieces of an SDXL pipeline that training and sampling need."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict


def load_vae(vae: str, dtype: torch.dtype = torch.float32):
    """An ``AutoencoderKL`` from a VAE folder, a pipeline folder (its ``vae/``) or a hub id.

    Args:
        vae: e.g. a local copy of ``madebyollin/sdxl-vae-fp16-fix``.
        dtype: weights dtype.
    """
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(path), dtype=dtype)
    if (path / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(path), subfolder="vae", dtype=dtype)
    if path.exists():
        raise BaseModelError(f"VAE {vae!r} has neither config.json nor vae/config.json: give a diffusers "
                             "AutoencoderKL folder (e.g. a local copy of madebyollin/sdxl-vae-fp16-fix).")
    return AutoencoderKL.from_pretrained(resolve_base(vae), dtype=dtype)


def load_parts(base: str, vae: str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, vae_dtype: torch.dtype | None = None,
               text_fp32_host: bool = False) -> SDXLParts:
    """Load tokenizers, text encoders, VAE and UNet of an SDXL base (frozen, eval mode), each weight read from its
    file straight into ``dtype`` on ``device``: no fp32 copy on the host of an fp16 base. A part that a fit's prior
    draw left with the same key (base_handoff.py) is taken instead of read; every other left part is released first.

    Args:
        base: local folder or hub id (see :func:`resolve_base`).
        vae: optional separate VAE folder, e.g. ``madebyollin/sdxl-vae-fp16-fix`` saved locally.
        dtype: dtype of the UNet and text encoders (the training dtype).
        device: where the weights land (None: the CPU). Needs ``accelerate`` to skip the host copy; without it the
            parts load on the CPU and move.
        vae_dtype: dtype of the VAE (None: ``dtype``).
        text_fp32_host: the text encoders load in fp32 on the CPU whatever ``dtype`` and ``device`` say (pivotal
            tuning initialises its new rows from the fp32 tables there, as diffusers' script does; the caller casts
            and moves them after).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from . import base_handoff

    root = resolve_base(base)
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    where = _placement(device)
    text_dtype, text_where = (torch.float32, {}) if text_fp32_host else (dtype, where)
    text_device = None if text_fp32_host else device
    loads = {  # name -> (dtype, device, how to read it): a part the prior sampler left with the same key is taken
        "tokenizer": (None, None, lambda: AutoTokenizer.from_pretrained(root, subfolder="tokenizer")),
        "tokenizer_2": (None, None, lambda: AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2")),
        "text_encoder": (text_dtype, text_device, lambda: CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", dtype=text_dtype, **text_where)),
        "text_encoder_2": (text_dtype, text_device, lambda: CLIPTextModelWithProjection.from_pretrained(
            root, subfolder="text_encoder_2", dtype=text_dtype, **text_where)),
        "vae": (vae_dtype, device, lambda: load_vae(vae, vae_dtype) if vae else AutoencoderKL.from_pretrained(
            root, subfolder="vae", dtype=vae_dtype, **where)),
        "unet": (dtype, device, lambda: UNet2DConditionModel.from_pretrained(root, subfolder="unet", dtype=dtype,
                                                                            **where)),
    }
    taken = base_handoff.take({name: base_handoff.part_key(root, vae, name, dt, dev)
                               for name, (dt, dev, _) in loads.items()})
    try:
        parts = SDXLParts(**{name: taken[name] if name in taken else read() for name, (_, _, read) in loads.items()},
                          scheduler_config=dict(DDPMScheduler.load_config(root, subfolder="scheduler")))
    except (OSError, ValueError) as e:
        raise BaseModelError(f"could not load the SDXL parts from {root!r}: {str(e).splitlines()[0][:300]}") from None
    for m in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
        m.requires_grad_(False).eval()
        if device is not None and not (text_fp32_host and m in (parts.text_encoder, parts.text_encoder_2)):
            m.to(device)  # a no-op where the weights landed there already
    return parts


def _placement(device: torch.device | str | None) -> dict:
    """``from_pretrained``'s arguments that read each weight straight onto ``device`` (accelerate's device map)."""
    if device is None or torch.device(device).type == "cpu":
        return {}
    try:
        import accelerate  # noqa: F401 - diffusers and transformers need it for a device map
    except ImportError:
        return {}
    return {"device_map": {"": torch.device(device)}}


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's 77 positions."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(text_encoders: Sequence[torch.nn.Module], token_ids: Sequence[torch.Tensor]):
    """SDXL prompt encoding, as ``StableDiffusionXLPipeline.encode_prompt`` does it.

    Args:
        text_encoders: ``(text_encoder, text_encoder_2)``.
        token_ids: matching ``[B, 77]`` ids from each tokenizer.
    Returns:
        ``(prompt_embeds [B, 77, d1 + d2], pooled [B, d2])``: the penultimate hidden states of both encoders
        concatenated, and the projected pooled output of the second (Podell et al. 2023, SDXL, sec. 2.1).
    """
    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = out[0]  # for text_encoder_2 (with projection) this is text_embeds
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def add_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning ``[B, 6]`` = (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


def _latent_moments(vae_config, like: torch.Tensor):
    """The VAE config's per-channel ``latents_mean``/``latents_std`` as ``[1, C, 1, 1]`` (None when absent)."""
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    return (torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like))


class PromptCache(dict):
    """Embeddings of frozen text encoders per prompt (prompt -> (embedding, pooled)), each computed once."""

    def encode(self, text_encoders: Sequence[torch.nn.Module], tokenizers, prompts: list[str]):
        """Stacked (embeddings, pooled embeddings) of ``prompts``, encoding only the ones not seen yet."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self]
        if missing:
            with torch.no_grad():
                emb, pooled = encode_prompts(text_encoders, [tokenize(t, missing) for t in tokenizers])
            for i, p in enumerate(missing):
                self[p] = (emb[i].detach(), pooled[i].detach())
        return torch.stack([self[p][0] for p in prompts]), torch.stack([self[p][1] for p in prompts])


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents to the UNet's space: ``(z - mean) * scaling_factor / std`` when the config has
    ``latents_mean``/``latents_std``, else ``z * scaling_factor`` (diffusers' ``train_dreambooth_lora_sdxl.py``)."""
    mean, std = _latent_moments(vae_config, latents)
    if mean is None:
        return latents * vae_config.scaling_factor
    return (latents - mean) * vae_config.scaling_factor / std


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Inverse of :func:`scale_latents`, before ``vae.decode`` (as ``StableDiffusionXLPipeline`` decodes)."""
    mean, std = _latent_moments(vae_config, latents)
    if mean is None:
        return latents / vae_config.scaling_factor
    return latents * std / vae_config.scaling_factor + mean
