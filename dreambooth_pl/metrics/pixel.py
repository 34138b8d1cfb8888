"""Pixel-space fidelity and drift: what a model that has no trained CLIP/DINO can still be measured with.

Fidelity (Ruiz et al. 2023, sec. 4.1, measured here in pixels): how close generated images are to the subject's
photos. Language drift (sec. 4.3): how far the fine-tuned model's samples of the class prompt move from the base
model's own samples at the same seeds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def _unit(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    img = img.convert("RGB")
    if size is not None and img.size != size:
        img = img.resize(size, Image.LANCZOS)
    return np.asarray(img, dtype=np.float64) / 255.0


def nearest_pixel_distance(images: Sequence[Image.Image], real: Sequence[Image.Image]) -> float:
    """Mean over ``images`` of the mean absolute pixel difference (in [0, 1]) to the nearest ``real`` photo,
    each photo resized to the image's size (LANCZOS). 0: every image copies a photo."""
    if not images or not real:
        raise ValueError("nearest_pixel_distance needs at least one image and one real photo")
    dists = []
    for img in images:
        a = _unit(img)
        dists.append(min(float(np.abs(a - _unit(r, img.size)).mean()) for r in real))
    return float(np.mean(dists))


def paired_pixel_distance(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> float:
    """Mean absolute pixel difference (in [0, 1]) between ``a[i]`` and ``b[i]`` (same prompt and seed)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_pixel_distance needs two non-empty lists of one length, got {len(a)} and {len(b)}")
    return float(np.mean([np.abs(_unit(x) - _unit(y, x.size)).mean() for x, y in zip(a, b)]))


def drift_scores(class_images: Sequence[Image.Image], base_class_images: Sequence[Image.Image], dino) -> dict:
    """Language drift of the class prompt: ``drift_pixel`` (paired pixel distance) and ``drift_dino``
    (1 - mean paired DINO cosine) between the fine-tuned and the base model's samples at the same seeds.

    Args:
        class_images: the fine-tuned model's samples of the class prompt.
        base_class_images: the base model's samples of the same prompts and seeds.
        dino: a DINO embedder (``metrics.load_dino``).
    """
    cos = (dino.embed_images(list(class_images)) * dino.embed_images(list(base_class_images))).sum(-1).mean()
    return {"drift_pixel": paired_pixel_distance(class_images, base_class_images), "drift_dino": 1.0 - float(cos)}
