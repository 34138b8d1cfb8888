"""``python -m dreambooth_pl generate-class-images``: the command line of data/class_images.py (the class-prior set
of DreamBooth, Ruiz et al. 2023, sec. 3.3), optionally filled from a fit config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from ..data.class_images import MANIFEST, NUM_CLASS_IMAGES, ClassImageSettings, draw_class_images
from ..io import check_output_dir
from ..sampling import SAMPLER, SamplerSettings


def _from_fit_config(path: str) -> dict:
    """``generate_class_images`` arguments that a fit config sets (data.priors.dir, model.base_model, ...), read with
    the fit command's own parser, so code defaults apply as they would in ``fit``."""
    from ..cli import read_fit_config

    if not Path(path).is_file():
        raise ValueError(f"fit config {path!r} does not exist.")
    cfg = read_fit_config(path, partial=True)
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    priors = data.get("priors") or {}
    found = dict(base=model.get("base_model"), vae=model.get("vae_model"), prompt=priors.get("prompt"),
                 out=priors.get("dir"), num=priors.get("num_images"), resolution=data.get("resolution"))
    if model.get("random_base") and model.get("base_model"):  # the smoke config's base is built on first use
        from ..bases import build_random_base

        build_random_base(model["random_base"], model["base_model"])
    return {k: v for k, v in found.items() if v is not None}


def generate_class_images(base: Optional[str] = None, prompt: Optional[str] = None, out: Optional[str] = None,
                          num: Optional[int] = None, seed: int = 0, sampler: SamplerSettings = SAMPLER,
                          resolution: Optional[int] = None, batch_size: Optional[int] = None,
                          dtype: Optional[str] = None, cache: bool = True, cache_dir: Optional[str] = None,
                          device: Optional[str] = None, vae: Optional[str] = None, fit_config: Optional[str] = None,
                          progress: bool = True, overwrite: bool = False,
                          base_dtype: Literal["float16", "float8", "nf4"] = "float16", vae_tiling: bool = False,
                          park_text_encoders: bool = False, fused_geglu: Optional[bool] = None,
                          constant_negative: bool = True, fused_norms: Optional[bool] = None,
                          channels_last: Optional[bool] = None, fp8_gemms: bool = False) -> str:
    """Draw class-prior images with the base model until ``out`` holds ``num`` images (resumable).

    Args:
        base: SDXL pipeline folder or hub id (or from ``fit_config``'s model.base_model).
        prompt: class prompt, e.g. ``a photo of dog`` (or data.priors.prompt).
        out: class image folder (or data.priors.dir).
        num: images the folder must hold (or data.priors.num_images; default 200, the paper's).
        seed: seed of image 0; image i uses ``seed + i``.
        sampler: scheduler (ddim, pndm, euler, euler_a, dpmpp_2m, ...), steps, guidance and negative prompt
            (``--sampler.steps 30``; sampling.SamplerSettings).
        resolution: square side in pixels, a multiple of 8 (None: the base's native size; or data.resolution).
        batch_size: images per UNet batch (None: 8 on a GPU with at least 40 GiB, else 4).
        dtype: bfloat16, float16 or float32 (None: bf16 where the GPU has it, fp16 on other GPUs, fp32 on a CPU).
        cache: link images the prior cache holds for the same settings instead of drawing them, and keep the
            drawn ones there (data/prior_cache.py).
        cache_dir: the prior cache's folder (None: ~/.cache/dreambooth_pl/priors).
        device: cuda, cpu, ... (None: CUDA when available).
        vae: separate VAE folder (or model.vae_model).
        fit_config: a fit YAML whose data/model sections fill the arguments left unset.
        progress: show a progress bar.
        overwrite: draw into an existing ``out`` that holds other files (docs/reliability.md, output folders).
        base_dtype: the UNet's linears stored in ``float8`` or ``nf4`` while drawing (an 8 GB GPU; quant.py).
        vae_tiling: decode in tiles (less memory at 1024²).
        park_text_encoders: the text encoders on the GPU only while they encode the prompt (an 8 GB GPU).
        fused_geglu: the one-kernel GEGLU (None: on a GPU with Triton and an fp16 base); ``false`` reuses class
            images drawn before it was the default (docs/generation.md).
        constant_negative: the zeroed negative prompt's cross-attentions filled in as their constant (no
            negative prompt); ``false`` reuses class images drawn before it was the default (docs/generation.md).
        fused_norms: the GroupNorms (with each resnet's add and SiLU) as Triton kernels (None: on a GPU with
            Triton); ``false`` reuses class images drawn before it was the default (docs/generation.md).
        channels_last: draw with the UNet in NHWC (None: where the fused norms run; docs/generation.md).
        fp8_gemms: the transformers' linears as float8 GEMMs (a GPU of compute capability 8.9+: faster, other
            images than the half-precision draw's; docs/generation.md).
    """
    from ..sampling import check_size

    args = dict(base=base, prompt=prompt, out=out, num=num, vae=vae, resolution=resolution)
    if fit_config:
        for k, v in _from_fit_config(fit_config).items():
            if args[k] is None:  # arguments given on the command line win over the config
                args[k] = v
    missing = [k for k in ("base", "prompt", "out") if not args[k]]
    if missing:
        raise ValueError(f"generate-class-images needs --{', --'.join(missing)} (or --fit_config with "
                         "model.base_model, data.priors.prompt and data.priors.dir).")
    check_size(args["resolution"], args["resolution"])
    check_output_dir(args["out"], "generate-class-images", "--out", overwrite, ours=("class_*.png", MANIFEST))
    settings = ClassImageSettings(sampler=sampler, resolution=args["resolution"], batch_size=batch_size, seed=seed,
                                  cache=cache, cache_dir=cache_dir, base_dtype=base_dtype, vae_tiling=vae_tiling,
                                  park_text_encoders=park_text_encoders, fused_geglu=fused_geglu,
                                  constant_negative=constant_negative, fused_norms=fused_norms,
                                  channels_last=channels_last, fp8_gemms=fp8_gemms)
    return draw_class_images(args["base"], args["prompt"], args["out"],
                             NUM_CLASS_IMAGES if args["num"] is None else args["num"], settings, dtype, device,
                             args["vae"], progress)
