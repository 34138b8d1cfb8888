"""``python -m dreambooth_pl generate-class-images``: the class-prior set of DreamBooth (Ruiz et al. 2023, sec. 3.3).

The base model itself draws N images of the class prompt into the class dir. Image ``class_%05d.png`` number i
always has seed ``seed + i``; a rerun counts the images already there and draws only the missing ones (never
overwriting a file), and each PNG is renamed into place only when complete. ``manifest.json`` beside the images
records prompt, seed, scheduler, steps, guidance and base of every image.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"


@dataclasses.dataclass
class ClassImageSettings:
    """How ``fit`` draws missing class images when ``data.generate_class_images`` is on.

    Args:
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        scheduler: a name of ``sampling.SCHEDULERS``.
        resolution: image side in pixels (None: ``data.resolution``).
        batch_size: images per UNet batch.
        seed: seed of image 0 (image i uses ``seed + i``).
        negative_prompt: prompt to steer away from.
    """

    steps: int = 25
    guidance: float = 5.0
    scheduler: str = "euler"
    resolution: Optional[int] = None
    batch_size: int = 4
    seed: int = 0
    negative_prompt: Optional[str] = None


def _from_fit_config(path: str) -> dict:
    """``generate_class_images`` arguments that a fit config sets (data.class_dir, model.base_model, ...)."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read fit config {path!r}: {e}") from None
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    found = dict(base=model.get("base_model"), vae=model.get("vae_model"), prompt=data.get("class_prompt"),
                 out=data.get("class_dir"), num=data.get("num_class_images"), resolution=data.get("resolution"))
    if model.get("random_base") and model.get("base_model"):  # the smoke config's base is built on first use
        from ..bases import build_random_base

        build_random_base(model["random_base"], model["base_model"])
    return {k: v for k, v in found.items() if v is not None}


def _todo(folder: Path, num: int) -> list[int]:
    """Indices to draw: as many as ``num`` minus the images present, skipping names that already exist."""
    from ..data.images import IMAGE_EXTS

    present = {p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")}
    todo, i = [], 0
    while len(todo) < num - len(present):
        if f"class_{i:05d}.png" not in present:
            todo.append(i)
        i += 1
    return todo


def generate_class_images(base: Optional[str] = None, prompt: Optional[str] = None, out: Optional[str] = None,
                          num: Optional[int] = None, seed: int = 0, scheduler: str = "euler", steps: int = 25,
                          guidance: float = 5.0, negative_prompt: Optional[str] = None,
                          resolution: Optional[int] = None, batch_size: int = 4, dtype: str = "float16",
                          device: Optional[str] = None, vae: Optional[str] = None, fit_config: Optional[str] = None,
                          progress: bool = True) -> str:
    """Draw class-prior images with the base model until ``out`` holds ``num`` images (resumable).

    Args:
        base: SDXL pipeline folder or hub id (or from ``fit_config``'s model.base_model).
        prompt: class prompt, e.g. ``a photo of dog`` (or data.class_prompt).
        out: class image folder (or data.class_dir).
        num: images the folder must hold (or data.num_class_images; default 200).
        seed: seed of image 0; image i uses ``seed + i``.
        scheduler: ddim, pndm, euler, euler_a, dpmpp_2m, ...
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        negative_prompt: prompt to steer away from.
        resolution: square side in pixels, a multiple of 8 (None: the base's native size; or data.resolution).
        batch_size: images per UNet batch.
        dtype: float16 (GPU) or float32 (CPU falls back to it).
        device: cuda, cpu, ... (None: CUDA when available).
        vae: separate VAE folder (or model.vae_model).
        fit_config: a fit YAML whose data/model sections fill the arguments left unset.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from ..sampling import check_size, generate, load_pipeline
    from ..io import ensure_writable, write_json, write_png
    from .sample import runtime

    args = dict(base=base, prompt=prompt, out=out, num=num, vae=vae, resolution=resolution)
    if fit_config:
        for k, v in _from_fit_config(fit_config).items():
            if args[k] is None:  # arguments given on the command line win over the config
                args[k] = v
    num = 200 if args["num"] is None else args["num"]
    missing = [k for k in ("base", "prompt", "out") if not args[k]]
    if missing:
        raise ValueError(f"generate-class-images needs --{', --'.join(missing)} (or --fit_config with "
                         "model.base_model, data.class_prompt and data.class_dir).")
    check_size(args["resolution"], args["resolution"])
    folder = ensure_writable(args["out"])
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"images": {}}
    if manifest.get("prompt", args["prompt"]) != args["prompt"]:
        raise ValueError(f"class dir {str(folder)!r} holds images of prompt {manifest['prompt']!r}, not "
                         f"{args['prompt']!r}: use another folder (class images of two prompts must not mix).")
    manifest["prompt"] = args["prompt"]
    todo = _todo(folder, num)
    if not todo:
        return f"{folder}: {num} class image(s) present, nothing to do"
    pipe = load_pipeline(args["base"], (), scheduler, dtype, device, args["vae"])
    settings = dict(base=args["base"], vae=args["vae"], loras=[], scheduler=scheduler, steps=steps,
                    guidance=guidance, negative_prompt=negative_prompt, **runtime(pipe))
    with tqdm(total=len(todo), desc=f"class images -> {folder}", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = generate(pipe, [args["prompt"]] * len(chunk), [seed + i for i in chunk], steps, guidance,
                              negative_prompt, args["resolution"], args["resolution"], batch_size)
            for i, img in zip(chunk, images):
                meta = dict(settings, prompt=args["prompt"], seed=seed + i, height=img.height, width=img.width)
                write_png(folder / f"class_{i:05d}.png", img, meta)
                manifest["images"][f"class_{i:05d}.png"] = {k: meta[k] for k in ("seed", "scheduler", "steps",
                                                                                    "guidance", "base", "height",
                                                                                    "width", "negative_prompt")}
            write_json(manifest_path, manifest)  # after every batch: an interrupted run keeps its record
            bar.update(len(chunk))
    del pipe
    return f"{folder}: generated {len(todo)} class image(s), {num} present"
