"""Mask files (``photo.mask.png`` beside ``photo.jpg``, data/faces.py) inspected with their photos, before any
model loads: a wrong size, an unreadable file or a decompression bomb makes the photo unusable (listed with the bad
images, same strict rule); an all-black mask with ``data.masks.floor: 0`` too, since that photo's instance loss is
then zero everywhere; a mask without a photo is named (a warning, an error in strict mode).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image

from .images import MASK_SUFFIX, MAX_PIXELS


def mask_path(photo: Path) -> Path:
    """Where the mask of ``photo`` lives: ``photo.mask.png`` beside it."""
    return photo.with_name(photo.stem + MASK_SUFFIX)


def inspect_mask(photo: Path, size: tuple[int, int] | None, floor: float) -> str | None:
    """Why the mask beside ``photo`` makes it unusable (None: no mask, or a usable one).

    Args:
        photo: the instance photo.
        size: its upright (width, height), as training loads it (None: not known, size not compared).
        floor: ``data.masks.floor``, the loss weight of black mask pixels.
    """
    side = mask_path(photo)
    if not side.exists():
        return None
    try:
        with warnings.catch_warnings():  # MAX_PIXELS decides, as for the photos
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(side) as m:
                w, h = m.size
                if w * h > MAX_PIXELS:
                    return (f"its mask {side.name} is {w}x{h} = {w * h:,} pixels, refused as a possible "
                            f"decompression bomb (limit {MAX_PIXELS:,}): save it at the photo's size")
                if size is not None and (w, h) != tuple(size):
                    return (f"its mask {side.name} is {w}x{h} but the photo is {size[0]}x{size[1]}: save the mask "
                            "at the photo's (upright) size")
                grey = m.convert("L")
    except Image.DecompressionBombError as e:  # Pillow refuses in open(), before the size can be read
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        return (f"its mask {side.name} has {count}, refused as a possible decompression bomb (limit "
                f"{MAX_PIXELS:,}): save it at the photo's size")
    except (OSError, SyntaxError, ValueError) as e:
        return f"its mask {side.name} cannot be read ({type(e).__name__}: {e}): re-export it as a PNG"
    if floor == 0 and grey.getextrema()[1] == 0:
        return (f"its mask {side.name} is all black and data.masks.floor is 0, so this photo would teach nothing: "
                "paint the subject white, or raise data.masks.floor")
    return None


def orphan_masks(folder: str | Path) -> list[Path]:
    """Mask files in ``folder`` with no photo of the same stem beside them (a renamed or deleted photo)."""
    folder = Path(folder)
    stems = {p.stem for p in folder.iterdir() if p.is_file() and not p.name.endswith(MASK_SUFFIX)}
    return sorted(p for p in folder.glob("*" + MASK_SUFFIX) if p.name[: -len(MASK_SUFFIX)] not in stems)
