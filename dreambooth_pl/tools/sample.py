"""``python -m dreambooth_pl sample``: base + LoRA files -> PNGs that carry their settings, a contact sheet, a manifest.

Each PNG stores its full settings as JSON in the ``dreambooth_pl`` text chunk (and an A1111-style ``parameters``
chunk for other viewers); ``sample --from_png IMAGE`` regenerates that image. Every file is written under a
temporary name and renamed, so an interrupted run leaves only complete files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

from ..io import check_output_dir, read_png_metadata, save_image, write_json, write_png
from ..sampling import SAMPLER, SamplerSettings, runtime

# what a PNG's metadata pins beside its sampler; the rest (out, batch size, device) do not change pixels.
REPRO_KEYS = ("base", "vae", "loras", "height", "width", "dtype")


def contact_sheet(images: list, labels: list[str], cols: int, thumb: int = 256):
    """One PIL image: ``images`` as thumbnails (longest side ``thumb``) in rows of ``cols``, one label per row."""
    import textwrap

    from PIL import Image, ImageDraw

    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    s = min(1.0, thumb / max(w, h))
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    wrapped = [textwrap.wrap(label, max(8, cols * tw // 6))[:4] or [""] for label in labels]  # ~6 px a glyph
    bar = 2 + 11 * max(len(lines) for lines in wrapped)
    sheet = Image.new("RGB", (cols * tw, rows * (th + bar)), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        draw.multiline_text((2, r * (th + bar) + 1), "\n".join(wrapped[r]), fill="black", spacing=1)
        for c, img in enumerate(images[r * cols:(r + 1) * cols]):
            sheet.paste(img.resize((tw, th)), (c * tw, r * (th + bar) + bar))
    return sheet


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def collect_prompts(prompt, prompt_file: Optional[str], suite: Optional[str], token: str, class_name: str) -> list:
    """Prompts from exactly one of: ``--prompt``, ``--prompt_file``, ``--suite``."""
    from ..prompts import fill, get_suite, read_prompt_file

    given = [n for n, v in (("prompt", prompt), ("prompt_file", prompt_file), ("suite", suite)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --prompt, --prompt_file, --suite (got {', '.join(given) or 'none'}).")
    if suite:
        return get_suite(suite, token, class_name)
    raw = _as_list(prompt) if prompt else read_prompt_file(prompt_file)
    return [fill(p, token, class_name) for p in raw]


def suites(token: str = "sks", class_name: str = "dog") -> str:
    """The built-in prompt suites, each with its size and first prompt.

    Args:
        token: identifier shown in the examples.
        class_name: class noun shown in the examples.
    """
    from ..prompts import get_suite, list_suites

    lines = []
    for name in list_suites():
        prompts = get_suite(name, token, class_name)
        lines.append(f"{name} ({len(prompts)} prompts), e.g. {prompts[0]!r}")
    return "\n".join(lines)


def sample(base: str = "stabilityai/stable-diffusion-xl-base-1.0", out: str = "outputs/samples",
           prompt: Union[str, list[str], None] = None, prompt_file: Optional[str] = None,
           suite: Optional[str] = None, token: str = "sks", class_name: str = "dog",
           lora: Union[str, list[str], None] = None, lora_scale: Union[float, list[float], None] = None,
           sampler: SamplerSettings = SAMPLER, height: Optional[int] = None, width: Optional[int] = None,
           seeds: Union[int, list[int], None] = None,
           seed: int = 0, images_per_prompt: int = 1, batch_size: int = 4, dtype: str = "float16",
           device: Optional[str] = None, vae: Optional[str] = None, vae_tiling: bool = False,
           vae_slicing: bool = True, from_png: Optional[str] = None, list_suites: bool = False,
           overwrite: bool = False, force: bool = False, embeddings: Union[str, list[str], None] = None) -> str:
    """Sample images from an SDXL base with zero or more LoRA files; writes PNGs, contact_sheet.png, manifest.json.

    Args:
        base: SDXL pipeline folder or hub id.
        out: output folder.
        prompt: one prompt or a list; ``{token}`` and ``{class}`` are filled in.
        prompt_file: text file, one prompt per line.
        suite: a named prompt suite (``--list_suites`` shows them).
        token: identifier that fills ``{token}``.
        class_name: class noun that fills ``{class}``.
        lora: adapter file(s) of any kind fit writes (LoRA, DoRA, LoKr, LoHa), diffusers or kohya layout.
        lora_scale: one scale per LoRA file (default 1.0 each).
        sampler: scheduler (ddim, pndm, euler, euler_a, dpmpp_2m, ...; sampling.SCHEDULERS), steps, guidance and
            negative prompt (``--sampler.steps 30``; sampling.SamplerSettings).
        height: image height in pixels, a multiple of 8 (None: the base's native size).
        width: image width in pixels, a multiple of 8 (None: the base's native size).
        seeds: one seed per image (prompt-major order); None: image k gets ``seed + k``.
        seed: first seed when ``seeds`` is not given.
        images_per_prompt: images per prompt (columns of the contact sheet).
        batch_size: images per UNet batch (does not change the images).
        dtype: float16 (GPU), bfloat16 or float32 (CPU).
        device: cuda, cpu, ... (None: CUDA when available).
        vae: separate VAE folder (e.g. the fp16-fix VAE).
        vae_tiling: decode in tiles (sizes above 1024 on small GPUs).
        vae_slicing: decode one image of a batch at a time (keeps batched 1024² decodes within 16 GB).
        from_png: regenerate the image a PNG of this tool records (its settings replace the ones above;
            pixels match on the same device type, batch size and library versions).
        list_suites: print the prompt suites and exit (also: ``python -m dreambooth_pl list-suites``).
        overwrite: write into an existing ``out`` that holds other files (docs/reliability.md, output folders).
        force: use LoRA files past the magnitude bound (a change of more than 10x a layer's weight).
        embeddings: token-embedding files of pivotal tuning (``*_emb.safetensors``; A1111/ComfyUI SDXL embeddings
            too), loaded into both text encoders; each replaces its identifier in the prompts with its tokens
            (PNGs record the prompt as written). None: the ``*_emb.safetensors`` beside each LoRA; [] for none.
    """
    from ..sampling import SamplingError, check_size, generate, load_pipeline

    if list_suites:
        return suites(token, class_name)
    loras = [[str(p), 1.0] for p in _as_list(lora)]
    scales = _as_list(lora_scale)
    if scales and len(scales) != len(loras):
        raise SamplingError(f"got {len(loras)} LoRA file(s) but {len(scales)} lora_scale value(s): give one scale "
                            "per file.")
    for pair, s in zip(loras, scales):
        pair[1] = float(s)
    from ..token_files import beside, prompt_rewriter

    found = [f for path, _ in loras for f in beside(path)] if embeddings is None else _as_list(embeddings)
    # what the PNGs record (flat, as PNGs of every version since the first do)
    settings = dict(base=base, vae=vae, loras=loras, height=height, width=width, dtype=dtype,
                    embeddings=[str(f) for f in dict.fromkeys(found)])
    if from_png:
        meta = read_png_metadata(from_png)
        settings.update({k: meta[k] for k in REPRO_KEYS}, embeddings=meta.get("embeddings", []))
        sampler = SamplerSettings(**{f.name: meta[f.name] for f in dataclasses.fields(SamplerSettings)})
        prompts, seed_list = [meta["prompt"]], [meta["seed"]]
    else:
        prompts = [p for p in collect_prompts(prompt, prompt_file, suite, token, class_name)
                   for _ in range(images_per_prompt)]
        seed_list = _as_list(seeds) or [seed + k for k in range(len(prompts))]
        if len(seed_list) != len(prompts):
            n_prompts = len(prompts) // images_per_prompt
            raise SamplingError(f"got {len(seed_list)} seed(s) for {len(prompts)} image(s) ({n_prompts} prompt(s) "
                                f"x images_per_prompt {images_per_prompt}): give one seed per image, or none "
                                "(then image k gets seed + k).")
    check_size(settings["height"], settings["width"])
    folder = check_output_dir(out, "sample", "--out", overwrite, ours=("*.png", "manifest.json"))
    rewrite = prompt_rewriter(settings["embeddings"])  # pivotal tuning: the identifier is the files' new tokens
    pipe = load_pipeline(settings["base"], [tuple(x) for x in settings["loras"]], sampler.scheduler,
                         settings["dtype"], device, settings["vae"], vae_tiling, vae_slicing, force,
                         settings["embeddings"])
    images = generate(pipe, [rewrite(p) for p in prompts], seed_list, sampler.steps, sampler.guidance,
                      sampler.negative_prompt, settings["height"], settings["width"], batch_size)
    settings.update(dataclasses.asdict(sampler), **runtime(pipe))
    records = []
    for k, (img, p, s) in enumerate(zip(images, prompts, seed_list)):
        meta = dict(settings, prompt=p, seed=int(s), height=img.height, width=img.width)
        write_png(folder / f"{k:04d}_s{s}.png", img, meta)
        records.append({"file": f"{k:04d}_s{s}.png", "prompt": p, "seed": int(s)})
    cols = 1 if from_png else images_per_prompt
    labels = [prompts[r * cols] for r in range(math.ceil(len(images) / cols))]
    save_image(folder / "contact_sheet.png", contact_sheet(images, labels, cols))
    write_json(folder / "manifest.json", {"settings": settings, "images": records})
    return str(folder / "manifest.json")
