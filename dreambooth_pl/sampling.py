"""SDXL sampling: a base + LoRA pipeline, schedulers by name, seeded per-image generation, safe-dtype VAE decode.

Every image draws its initial noise (and any ancestral noise) from its own CPU generator seeded with its seed,
so image i depends only on its prompt and seed, not on its batch or its neighbours. Latents are decoded here rather than
by the pipeline, so a fp16 UNet can sit beside an fp32 VAE (the SDXL VAE overflows in fp16; Podell et al. 2023).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Sequence

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

from .adapter.apply import apply_adapter
from .adapter.base import check_base
from .adapter.files import LORA_FILE, read_adapter
from .adapter.value import COMPONENTS
from .io.magnitude import base_weights, check_magnitude
from .sdxl import DTYPES, load_vae, resolve_base, unscale_latents
from .zero_negative import ConstantNegative
# the settings type lives where torch is not imported (the Ray drivers of ablate and fit-many parse it); re-exported
from .sampler_settings import SAMPLER, SamplerSettings, SamplingError  # noqa: F401

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def make_scheduler(name: str, config: dict):
    """Scheduler ``name`` built from the base's scheduler config (its betas and timestep spacing).

    Args:
        name: a key of :data:`SCHEDULERS`.
        config: the base's ``scheduler/scheduler_config.json`` as a dict.
    """
    if name not in SCHEDULERS:
        raise SamplingError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmpp_2m" else {}
    return SCHEDULERS[name].from_config(dict(config), **kwargs)


def check_size(height: int | None, width: int | None) -> None:
    """Sizes must be positive multiples of 8: the VAE maps 8x8 pixels to one latent."""
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v <= 0 or v % 8):
            raise SamplingError(f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {v}; "
                                f"try {max(8, round(v / 8) * 8)}")


def add_loras(pipe, loras: Sequence[tuple[str, float]], force: bool = False) -> None:
    """Load each ``(file or run folder, scale)`` as adapter ``lora<i>``: any kind fit writes (LoRA, DoRA, LoKr,
    LoHa), either layout (diffusers or kohya/LyCORIS), through the same peft layers fit trains; activate all.
    ``force`` skips the magnitude check (io/magnitude.py)."""
    names, models = [], {c: getattr(pipe, c) for c in COMPONENTS}
    for i, (path, scale) in enumerate(loras):
        if Path(path).is_dir():  # a run folder holding the exported file
            path = str(Path(path) / LORA_FILE)
        if not Path(path).is_file():
            raise SamplingError(f"LoRA file {str(path)!r} does not exist: give the .safetensors that fit exported "
                                "(lightning_logs/version_N/pytorch_lora_weights.safetensors).")
        adapter = read_adapter(path, pipe.unet.config)  # names the first bad key of a broken or foreign file
        check_base(adapter, models, str(path))
        check_magnitude(adapter.weights, adapter.alphas, str(path), base_weights(models, adapter.modules()), scale,
                        force)
        names.append(f"lora{i}")
        apply_adapter(models, adapter, names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=[float(s) for _, s in loras])


def load_pipeline(base: str, loras: Sequence[tuple[str, float]] = (), scheduler: str = SAMPLER.scheduler,
                  dtype: str = "float16", device: str | None = None, vae: str | None = None,
                  vae_tiling: bool = False, vae_slicing: bool = True, force: bool = False,
                  embeddings: Sequence[str] = ()):
    """An SDXL pipeline of ``base`` with LoRA files applied at their scales, ready on ``device``.

    Args:
        base: SDXL pipeline folder or hub id.
        loras: ``(file, scale)`` pairs; adapter files of any kind, diffusers or kohya layout.
        scheduler: a key of :data:`SCHEDULERS`.
        dtype: weights dtype of UNet and text encoders (float16 halves memory: SDXL + LoRA fits 16 GB).
        device: ``cuda``, ``cpu``, ... (None: CUDA when available).
        vae: a separate VAE folder; an fp16-fix VAE (``force_upcast: false``) then decodes in fp16.
        vae_tiling: decode in overlapping tiles (large sizes on small GPUs).
        vae_slicing: decode one image of a batch at a time (default: a batch of fp32 1024² decodes would not
            fit 16 GB beside the fp16 UNet; the time cost is negligible).
        force: load LoRA files past the magnitude bound (io/magnitude.py).
        embeddings: token-embedding files (pivotal tuning's ``*_emb.safetensors``; token_files.py) loaded into both
            text encoders; prompts then need ``token_files.prompt_rewriter(embeddings)``.
    """
    from diffusers import StableDiffusionXLPipeline

    if dtype not in DTYPES:
        raise SamplingError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "float16" and torch.device(device).type == "cpu":
        warnings.warn("float16 sampling on CPU is slow or unsupported; using float32.", stacklevel=2)
        dtype = "float32"
    root = resolve_base(base)
    extra = {"vae": load_vae(vae, DTYPES[dtype])} if vae else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(root, dtype=DTYPES[dtype], add_watermarker=False,
                                                     **extra)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows to NaN in fp16; the fp16-fix VAE does not
    add_loras(pipe, loras, force)
    if embeddings:
        from .token_files import load_into

        load_into(pipe, embeddings)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_from_module(module, scheduler: str = SAMPLER.scheduler):
    """An SDXL pipeline over a :class:`DreamBoothLoRA`'s live modules (shared, not copied; adapters active)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=module.vae, text_encoder=module.text_encoder, text_encoder_2=module.text_encoder_2,
        tokenizer=module.tokenizers[0], tokenizer_2=module.tokenizers[1], unet=module.unet,
        scheduler=make_scheduler(scheduler, module.scheduler_config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images from SDXL latents, decoded in the VAE's own dtype (fp32 unless an fp16-fix VAE was given)."""
    vae = pipe.vae
    latents = unscale_latents(latents, vae.config)
    # outside any autocast (a 16-mixed trainer samples under one): the SDXL VAE overflows in fp16; one image at a
    # time, as vae slicing does, so a 1024² fp32 decode stays a small transient beside a training run
    with torch.autocast(vae.device.type, enabled=False):
        image = torch.cat([vae.decode(x[None].to(vae.device, vae.dtype), return_dict=False)[0] for x in latents])
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = SAMPLER.steps, guidance: float = SAMPLER.guidance,
             negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
             batch_size: int = 4) -> list:
    """One PIL image per ``(prompt, seed)``; image i depends only on ``prompts[i]`` and ``seeds[i]``.

    Args:
        pipe: an SDXL pipeline (:func:`load_pipeline` or :func:`pipeline_from_module`).
        prompts: one prompt per image.
        seeds: one seed per image (its initial and ancestral noise come from a CPU generator with this seed).
        steps: denoising steps.
        guidance: classifier-free guidance scale (Ho & Salimans 2022); <= 1 turns it off.
        negative_prompt: prompt to steer away from (None: SDXL's zero unconditional embedding).
        height, width: image size in pixels, multiples of 8 (None: the base's native size).
        batch_size: images per UNet batch.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise SamplingError(f"got {len(prompts)} prompt(s) but {len(seeds)} seed(s): give one seed per image.")
    if steps < 1 or batch_size < 1:
        raise SamplingError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    check_size(height, width)
    # no negative prompt: the pipeline guides with zero embeddings, whose cross-attentions are a constant
    # (zero_negative.py); the pipeline's batch is [negatives; positives], one row per image each
    zeroed = (guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # the pipeline's guidance rule
              and not negative_prompt and bool(pipe.config.get("force_zeros_for_empty_prompt")))
    constant = ConstantNegative(pipe.unet) if zeroed else None
    images = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for s in chunk_seeds]
            with constant.zero_rows(len(chunk)) if constant is not None else contextlib.nullcontext():
                latents = pipe(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk) if negative_prompt
                               else None, num_inference_steps=steps, guidance_scale=guidance, height=height,
                               width=width, generator=gens, output_type="latent").images
            images += decode_latents(pipe, latents)
    finally:
        if constant is not None:
            constant.remove()
    return images


def runtime(pipe) -> dict:
    """What ran, beside the settings: the effective dtype (CPU runs fp16 requests in fp32), device, versions, and
    ``random_base`` (the make-base preset, or None) so a PNG drawn from random weights says so."""
    import diffusers

    from .sdxl import dtype_name, random_base_preset

    return {"dtype": dtype_name(pipe.unet.dtype), "device": pipe.device.type,
            "random_base": random_base_preset(pipe.name_or_path) if pipe.name_or_path else None,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
