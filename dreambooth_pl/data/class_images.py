"""The class-prior set of DreamBooth (Ruiz et al. 2023, sec. 3.3): the base draws N images of the class prompt.

Image ``class_%05d.png`` number i always has seed ``seed + i``; a rerun counts the images already there and draws
only the missing ones (never overwriting a file), and each PNG is renamed into place only when complete.
``manifest.json`` beside the images records prompt, seed, scheduler, steps, guidance and base of every image.
Both the ``generate-class-images`` verb and the DataModule (``data.generate_class_images``) call
:func:`draw_class_images`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..sampling import SAMPLER

MANIFEST = "manifest.json"
NUM_CLASS_IMAGES = 200  # the paper's and diffusers' default size of the prior set


@dataclasses.dataclass
class ClassImageSettings:
    """How class images are drawn.

    Args:
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        scheduler: a name of ``sampling.SCHEDULERS``.
        resolution: image side in pixels (None: the base's native size; fit uses ``data.resolution``).
        batch_size: images per UNet batch.
        seed: seed of image 0 (image i uses ``seed + i``).
        negative_prompt: prompt to steer away from.
    """

    steps: int = SAMPLER.steps
    guidance: float = SAMPLER.guidance
    scheduler: str = SAMPLER.scheduler
    resolution: Optional[int] = None
    batch_size: int = 4
    seed: int = 0
    negative_prompt: Optional[str] = None


def missing_indices(folder: Path, num: int) -> list[int]:
    """Indices to draw: as many as ``num`` minus the images present, skipping names that already exist."""
    from .images import IMAGE_EXTS

    present = {p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")}
    todo, i = [], 0
    while len(todo) < num - len(present):
        if f"class_{i:05d}.png" not in present:
            todo.append(i)
        i += 1
    return todo


def draw_class_images(base: str, prompt: str, out: str, num: int = NUM_CLASS_IMAGES,
                      settings: Optional[ClassImageSettings] = None, dtype: str = "float16",
                      device: Optional[str] = None, vae: Optional[str] = None, progress: bool = True) -> str:
    """Draw class images with ``base`` until ``out`` holds ``num`` images; returns a one-line report.

    Args:
        base: SDXL pipeline folder or hub id.
        prompt: class prompt, e.g. ``a photo of dog``.
        out: class image folder (created if missing).
        num: images the folder must hold.
        settings: sampler, size, batch and seed of the images (None: the defaults).
        dtype: float16 (GPU) or float32 (CPU falls back to it).
        device: cuda, cpu, ... (None: CUDA when available).
        vae: separate VAE folder.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from ..io import ensure_writable, read_json, write_json, write_png
    from ..sampling import check_size, generate, load_pipeline, runtime

    s = settings or ClassImageSettings()
    check_size(s.resolution, s.resolution)
    folder = ensure_writable(out)
    manifest_path = folder / MANIFEST
    manifest = read_json(manifest_path, "class-image manifest", ("images",)) if manifest_path.exists() else {"images": {}}
    if manifest.get("prompt", prompt) != prompt:
        raise ValueError(f"class dir {str(folder)!r} holds images of prompt {manifest['prompt']!r}, not "
                         f"{prompt!r}: use another folder (class images of two prompts must not mix).")
    manifest["prompt"] = prompt
    todo = missing_indices(folder, num)
    if not todo:
        return f"{folder}: {num} class image(s) present, nothing to do"
    pipe = load_pipeline(base, (), s.scheduler, dtype, device, vae)
    meta_base = dict(base=base, vae=vae, loras=[], scheduler=s.scheduler, steps=s.steps, guidance=s.guidance,
                     negative_prompt=s.negative_prompt, **runtime(pipe))
    with tqdm(total=len(todo), desc=f"class images -> {folder}", disable=not progress) as bar:
        for start in range(0, len(todo), s.batch_size):
            chunk = todo[start:start + s.batch_size]
            images = generate(pipe, [prompt] * len(chunk), [s.seed + i for i in chunk], s.steps, s.guidance,
                              s.negative_prompt, s.resolution, s.resolution, s.batch_size)
            for i, img in zip(chunk, images):
                meta = dict(meta_base, prompt=prompt, seed=s.seed + i, height=img.height, width=img.width)
                write_png(folder / f"class_{i:05d}.png", img, meta)
                manifest["images"][f"class_{i:05d}.png"] = {k: meta[k] for k in ("seed", "scheduler", "steps",
                                                                                    "guidance", "base", "height",
                                                                                    "width", "negative_prompt")}
            write_json(manifest_path, manifest)  # after every batch: an interrupted run keeps its record
            bar.update(len(chunk))
    del pipe
    return f"{folder}: generated {len(todo)} class image(s), {num} present"
