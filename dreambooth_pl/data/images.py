"""Image intake shared by every command: find images in a folder, validate them all, load them as RGB."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = {".txt", ".caption"}
# Side files that live beside images without being images (captions, manifests, credits).
SIDE_FILES = CAPTION_EXTS | {".json", ".md", ".yaml", ".yml", ".csv"}


class ImageIntakeError(ValueError):
    """One or more input images are missing or unusable; the message lists every problem with its file."""


def list_images(folder: str | Path, role: str = "image") -> list[Path]:
    """Sorted image files in ``folder``; other files are skipped and named in a single warning.

    Args:
        folder: directory to scan (not recursive).
        role: what the folder is for, used in messages (``instance``, ``class``, ``reference``).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise ImageIntakeError(f"{role} dir {str(path)!r} does not exist: create it and put the {role} images in it, "
                               "or fix the path in the config.")
    if not path.is_dir():
        raise ImageIntakeError(f"{role} dir {str(path)!r} is a file, not a folder of images.")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTS | SIDE_FILES]
    if skipped:
        warnings.warn(f"{role} dir {str(path)!r}: skipped {len(skipped)} non-image file(s): {', '.join(skipped)}",
                      stacklevel=2)
    if not images:
        raise ImageIntakeError(f"{role} dir {str(path)!r} holds no images ({', '.join(sorted(IMAGE_EXTS))}): add "
                               f"the {role} photos there.")
    return images


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB: apply EXIF orientation, composite transparency on white, convert any mode to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")  # 16-bit -> 8-bit before RGB
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` (first frame of an animation) as an upright RGB image, fully decoded."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        return to_rgb(img)


def validate_images(paths: list[Path], role: str = "image") -> list[tuple[int, int]]:
    """Decode every file; raise one :class:`ImageIntakeError` listing all unreadable files. Returns (w, h) sizes."""
    sizes, problems = [], []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                sizes.append(ImageOps.exif_transpose(img).size)
        except Exception as e:  # PIL raises many types for truncated, corrupt or unsupported files
            problems.append(f"  {p}: {type(e).__name__}: {e}")
    if problems:
        raise ImageIntakeError(f"{len(problems)} {role} image(s) cannot be read — fix or remove them:\n"
                               + "\n".join(problems))
    return sizes


def caption_for(path: Path) -> str | None:
    """The per-image caption in ``photo.txt`` (or ``photo.caption``) beside ``photo.jpg``, if any."""
    for ext in CAPTION_EXTS:
        side = path.with_suffix(ext)
        if side.exists():
            text = side.read_text(encoding="utf-8").strip()
            if text:
                return text
    return None
