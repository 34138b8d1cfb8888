"""Resize, crop and flip for SDXL training, recording the crop for micro-conditioning (Podell et al. 2023, sec. 2.2)."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import functional as TF

# diffusers' train_dreambooth_lora_sdxl.py resizes with --image_interpolation_mode=lanczos (PIL's own filter,
# antialiased); bilinear on a downscale differs by up to 0.68 on the [-1, 1] scale.
INTERPOLATION = TF.InterpolationMode.LANCZOS


def prepare_image(img: Image.Image, resolution: int, center_crop: bool, flip: bool,
                  generator: torch.Generator, interpolation: TF.InterpolationMode = INTERPOLATION) -> dict:
    """Shortest side to ``resolution``, square crop, optional horizontal flip, pixels in [-1, 1].

    Args:
        img: RGB image.
        resolution: output side in pixels.
        center_crop: centre crop instead of a random one.
        flip: mirror the image (the recorded crop is mirrored too).
        generator: source of the random crop offsets (seeded per example for exact resume).
        interpolation: resize filter (PIL's, through torchvision).
    Returns:
        ``pixel_values [3, R, R]``, ``original_size (h, w)`` of the input, ``crop_top_left (top, left)``.
    """
    original_size = (img.height, img.width)
    img = TF.resize(img, resolution, interpolation=interpolation)
    w, h = img.size
    if center_crop:
        top, left = max(0, round((h - resolution) / 2)), max(0, round((w - resolution) / 2))
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    img = TF.crop(img, top, left, resolution, resolution)
    if flip:
        img = TF.hflip(img)
        left = w - left - resolution
    pixels = TF.normalize(TF.to_tensor(img), [0.5], [0.5])
    return {"pixel_values": pixels, "original_size": original_size, "crop_top_left": (top, left)}
