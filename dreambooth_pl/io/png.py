"""PNGs that carry their settings: JSON in the ``dreambooth_pl`` text chunk, A1111-style ``parameters`` beside it."""
from __future__ import annotations

import io as _stdio
import json
import os
from pathlib import Path

from .files import atomic_write
from .load import parse_json

PNG_KEY = "dreambooth_pl"


def a1111_parameters(meta: dict) -> str:
    """The ``parameters`` text other tools (A1111, ComfyUI readers) show: prompt, negative, then key: value."""
    neg = f"\nNegative prompt: {meta['negative_prompt']}" if meta.get("negative_prompt") else ""
    loras = ", ".join(f"{Path(p).name}:{s}" for p, s in meta.get("loras") or [])
    base = meta["base"] + (f" (RANDOM weights: {meta['random_base']})" if meta.get("random_base") else "")
    return (f"{meta['prompt']}{neg}\nSteps: {meta['steps']}, Sampler: {meta['scheduler']}, CFG scale: "
            f"{meta['guidance']}, Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {base}"
            + (f", LoRA: {loras}" if loras else ""))


def save_image(path: str | os.PathLike, image, format: str = "PNG", **kwargs) -> Path:
    """Save a PIL image atomically (encoded in memory first, so a failed encode leaves no file)."""
    buf = _stdio.BytesIO()
    image.save(buf, format=format, **kwargs)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_png(path: str | os.PathLike, image, meta: dict) -> Path:
    """Save ``image`` as PNG with ``meta`` in its text chunks (JSON + A1111 ``parameters``), atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(meta))
    info.add_text("parameters", a1111_parameters(meta))
    return save_image(path, image, pnginfo=info)


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The settings a PNG written by :func:`write_png` records."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(PNG_KEY)
    except UnidentifiedImageError:
        raise ValueError(f"{str(path)!r} is not a readable image: give a PNG written by sample.") from None
    if text is None:
        raise ValueError(f"{str(path)!r} has no {PNG_KEY!r} text chunk: only PNGs written by sample or "
                         "generate-class-images record their settings.")
    meta = parse_json(text, f"{path} ({PNG_KEY} text chunk)")
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r}: its {PNG_KEY!r} text chunk is not a settings object.")
    return meta
