"""Resize, crop and flip for SDXL training, recording the crop for micro-conditioning (Podell et al. 2023, sec. 2.2)."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import functional as TF

# diffusers' train_dreambooth_lora_sdxl.py resizes with --image_interpolation_mode=lanczos (PIL's own filter,
# antialiased); bilinear on a downscale differs by up to 0.68 on the [-1, 1] scale.
INTERPOLATION = TF.InterpolationMode.LANCZOS  # a change here or in prepare_image: bump latent_store.FORMAT


def prepare_image(img: Image.Image, resolution: int | tuple[int, int], center_crop: bool, flip: bool,
                  generator: torch.Generator, focus: tuple[float, float] | None = None,
                  mask: Image.Image | None = None, interpolation: TF.InterpolationMode = INTERPOLATION) -> dict:
    """Shortest side to ``resolution``, square crop, optional horizontal flip, pixels in [-1, 1].

    Args:
        img: RGB image.
        resolution: output side in pixels, or an aspect bucket's ``(height, width)`` (data/buckets.py): the image
            is then scaled to cover it and cropped to it.
        center_crop: centre crop instead of a random one.
        flip: mirror the image before cropping (the recorded crop is the mirrored image's, as in diffusers' script).
        generator: source of the random crop offsets (seeded per example for exact resume).
        focus: ``(x, y)`` fractions of the image to centre the crop on (a face, data/faces.py), clamped inside.
        mask: an ``L`` image of the input's size, cropped and flipped with it (loss weights, data/faces.py).
        interpolation: resize filter (PIL's, through torchvision).
    Returns:
        ``pixel_values [3, R, R]``, ``original_size (h, w)`` of the input, ``crop_top_left (top, left)``, and with
        ``mask`` ``loss_mask [1, R, R]`` in [0, 1].
    """
    original_size = (img.height, img.width)
    rh, rw = (resolution, resolution) if isinstance(resolution, int) else resolution
    cover = max(rh / img.height, rw / img.width)  # bucket: the smallest scale at which the image covers it
    size = resolution if rh == rw else [max(rh, round(img.height * cover)), max(rw, round(img.width * cover))]
    img = TF.resize(img, size, interpolation=interpolation)
    w, h = img.size
    if mask is not None:
        mask = TF.resize(mask, [h, w], interpolation=TF.InterpolationMode.BILINEAR)
    if flip:  # before the crop, as diffusers' script does: with an odd margin the centre crop then matches it
        img, mask = TF.hflip(img), (TF.hflip(mask) if mask is not None else None)
        focus = (1.0 - focus[0], focus[1]) if focus is not None else None
    if focus is not None:
        top = min(max(0, round(focus[1] * h - rh / 2)), h - rh)
        left = min(max(0, round(focus[0] * w - rw / 2)), w - rw)
    elif center_crop:  # Python's round, as torchvision's CenterCrop: half-way margins round to even
        top, left = max(0, round((h - rh) / 2)), max(0, round((w - rw) / 2))
    else:
        top = int(torch.randint(0, h - rh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - rw + 1, (1,), generator=generator))
    img = TF.crop(img, top, left, rh, rw)
    out = {"loss_mask": TF.to_tensor(TF.crop(mask, top, left, rh, rw))} if mask is not None else {}
    pixels = TF.normalize(TF.to_tensor(img), [0.5], [0.5])
    return {"pixel_values": pixels, "original_size": original_size, "crop_top_left": (top, left), **out}
