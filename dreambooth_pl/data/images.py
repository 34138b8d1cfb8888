"""Image intake shared by every command: find images in a folder, check them all at once, load them as RGB.

Every command (training data, class images, evaluation references) goes through :func:`list_images`,
:func:`check_images` and :func:`load_rgb`, so a phone or web photo gets the same answer everywhere;
:func:`decode_rgb` is :func:`load_rgb` for callers that already hold :func:`quiet_bombs` (the cache's decode-ahead
threads), and :func:`decode_all` checks a folder on threads.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}
# Formats people do drop in that Pillow cannot read as shipped: listed so the answer says what to convert to.
UNSUPPORTED_EXTS = {".heic": "HEIC", ".heif": "HEIF", ".dng": "camera RAW (DNG)", ".cr2": "camera RAW (CR2)",
                    ".cr3": "camera RAW (CR3)", ".nef": "camera RAW (NEF)", ".arw": "camera RAW (ARW)",
                    ".raw": "camera RAW", ".svg": "SVG (vector)", ".jxl": "JPEG XL"}
CAPTION_EXTS = {".txt", ".caption"}
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.jpg: loss weights, not a training image (data/faces.py)
# Side files that live beside images without being images (captions, manifests, credits).
SIDE_FILES = CAPTION_EXTS | {".json", ".md", ".yaml", ".yml", ".csv"}
# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP): a 200 MP phone photo is refused, a
# decompression bomb (a tiny file that decodes to gigabytes) is refused before it is decoded.
MAX_PIXELS = 2 * 89_478_485
# Images whose shortest side is below resolution / MAX_UPSCALE are refused: more than 4x upscaling teaches blur.
MAX_UPSCALE = 4.0
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
_CONVERT = "convert it to JPEG or PNG"
DECODE_WORKERS = min(8, os.cpu_count() or 1)  # threads that check a folder's images (check_images)
T = TypeVar("T")


class ImageIntakeError(ValueError):
    """One or more input images are missing or unusable; the message lists every problem with its file."""


@dataclass
class ImageReport:
    """What intake found for one file: its upright size, the problem that makes it unusable, what was done."""

    path: Path
    size: tuple[int, int] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def list_images(folder: str | Path, role: str = "image") -> list[Path]:
    """Sorted image files in ``folder`` (known-unsupported formats included, so checks can name them).

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
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(MASK_SUFFIX))
    known = IMAGE_EXTS | set(UNSUPPORTED_EXTS)
    images = [p for p in files if p.suffix.lower() in known]
    skipped = [p.name for p in files if p.suffix.lower() not in known | SIDE_FILES]
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
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey: keep the top 8 bits, not a clipped 0..255
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def _sniff(path: Path) -> str:
    """Name the format of a file Pillow could not identify, from its extension or first bytes."""
    fmt = UNSUPPORTED_EXTS.get(path.suffix.lower())
    with open(path, "rb") as f:
        head = f.read(16)
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        fmt = "HEIC/HEIF"
    if fmt:
        hint = " (e.g. `heif-convert in.heic out.jpg`, iPhone: Settings > Camera > Formats > Most Compatible, " \
               "or pip install pillow-heif)" if "HE" in fmt else ""
        return f"{fmt} is not a format Pillow reads here: {_CONVERT}{hint}"
    return f"not an image Pillow can read (content starts with {head[:8]!r}): {_CONVERT}, or remove it"


@contextmanager
def quiet_bombs():
    """Pillow's ``DecompressionBombWarning`` silenced for the block: :data:`MAX_PIXELS` decides. The warnings
    filter is process-wide, so code that decodes on worker threads enters this once, on the thread that starts
    them (``catch_warnings`` entered on several threads at once restores the filters in a racy order)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def decode_all(fn: Callable[[Path], T], paths: list[Path], workers: int = DECODE_WORKERS) -> list[T]:
    """``[fn(p) for p in paths]`` on up to ``workers`` threads, in order, under :func:`quiet_bombs` (Pillow's
    decoders release the GIL: checking a 197-image class folder took 9.7 s of one H100 fit's start one by one);
    ``fn`` must not enter ``catch_warnings`` itself."""
    with quiet_bombs():
        if workers < 2 or len(paths) < 2:
            return [fn(p) for p in paths]
        # a bad file stops the folder there: map's iterator cancels the images not yet started when it raises
        with ThreadPoolExecutor(max_workers=min(workers, len(paths)), thread_name_prefix="image-check") as pool:
            return list(pool.map(fn, paths))


def inspect_image(path: str | Path, resolution: int | None = None) -> ImageReport:
    """Fully decode ``path`` and report its upright size, what makes it unusable, and what loading will do.

    Args:
        path: image file.
        resolution: training side in pixels; smaller images are upscaled with a note, or refused below
            ``resolution / MAX_UPSCALE`` (None: no size check, e.g. evaluation references).
    """
    with quiet_bombs():
        return _inspect(Path(path), resolution)


def _inspect(path: Path, resolution: int | None) -> ImageReport:
    """:func:`inspect_image` without touching the warnings filter (its callers hold :func:`quiet_bombs`)."""
    rep = ImageReport(path)
    size = "its size"
    try:
        if path.stat().st_size == 0:
            rep.error = "empty file (0 bytes): re-copy or re-download it"
            return rep
        with Image.open(path) as img:  # our MAX_PIXELS decides; Pillow's softer bomb warning is silenced
            w, h = img.size
            size = f"{w}x{h} = {w * h:,} pixels"
            if w * h > MAX_PIXELS:
                raise Image.DecompressionBombError(size)
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format == "MPO":  # a camera JPEG with embedded previews, not an animation
                rep.notes.append(f"MPO camera photo with {frames - 1} embedded preview/extra image(s): using "
                                 "the primary image")
            elif frames > 1:
                rep.notes.append(f"animated ({frames} frames): using the first frame")
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            mode = img.mode
            alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
            rep.size = ImageOps.exif_transpose(img).size
    except Image.DecompressionBombError as e:  # Pillow refuses in open() before we see the size: it names the count
        if size == "its size":
            size = str(e).split("(")[-1].split(")")[0]
        rep.error = (f"refused as a possible decompression bomb: {size} exceeds the "
                     f"{MAX_PIXELS:,}-pixel limit: downscale it (e.g. to 2048 px on the long side)")
        return rep
    except UnidentifiedImageError:
        rep.error = _sniff(path)
        return rep
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's truncated/corrupt-data errors
        rep.error = f"truncated or corrupt ({type(e).__name__}: {e}): re-export or re-download it"
        return rep
    if orientation not in (1, None):
        rep.notes.append(f"rotated upright (EXIF orientation {orientation})")
    if mode not in ("RGB", "L"):
        rep.notes.append(f"converted {mode} to RGB" + (" with transparency composited on white" if alpha else ""))
    if resolution:
        short = min(rep.size)
        floor = resolution / MAX_UPSCALE
        if short < floor:
            rep.error = (f"too small: {rep.size[0]}x{rep.size[1]}, shortest side {short} px is below the floor of "
                         f"{floor:g} px (resolution {resolution} / {MAX_UPSCALE:g}): use a larger photo or a "
                         "lower data.resolution")
        elif short < resolution:
            rep.notes.append(f"upscaled: shortest side {short} px < resolution {resolution} (may look soft)")
    return rep


def check_images(paths: list[Path], role: str = "image", resolution: int | None = None,
                 strict: bool = True, mask_floor: float | None = None) -> list[Path]:
    """Inspect every file before any model loads; report all problems at once. Returns the usable paths.

    Args:
        paths: image files (e.g. from :func:`list_images`).
        role: what the images are for, used in messages.
        resolution: training side, for the upscale note and the too-small floor (None: no size check).
        strict: raise one :class:`ImageIntakeError` listing every unusable file (default); False skips them
            with a warning.
        mask_floor: inspect each photo's mask file too (data/masks.py), with this ``data.masks.floor`` (None: no
            masks, as for class and reference images).
    """
    return [r.path for r in _reports(paths, role, resolution, strict, mask_floor)]


def _reports(paths: list[Path], role: str, resolution: int | None, strict: bool,
             mask_floor: float | None = None) -> list[ImageReport]:
    """Reports of the usable files, after one warning with every adjustment and one error (or skip) list."""
    reports = decode_all(lambda p: _inspect(Path(p), resolution), paths)
    for r in reports:  # captions are read in training: a bad one must fail here, with the images, not mid-run
        if not r.error:
            try:
                caption_for(r.path)
            except ImageIntakeError as e:
                r.error = str(e)
        if not r.error and mask_floor is not None:  # a bad mask costs the photo, found here, not mid-run
            from .masks import inspect_mask

            r.error = inspect_mask(r.path, r.size, mask_floor)
    bad = [r for r in reports if r.error]
    notes = [f"  {r.path}: {n}" for r in reports if not r.error for n in r.notes]
    if notes:
        warnings.warn(f"{role} images adjusted on load:\n" + "\n".join(notes), stacklevel=3)
    lines = "\n".join(f"  {r.path}: {r.error}" for r in bad)
    if bad and (strict or len(bad) == len(reports)):
        fix = "fix or remove them" + (", or set data.strict_images: false to skip them" if strict else "")
        raise ImageIntakeError(f"{len(bad)} of {len(reports)} {_what(role)} cannot be used — {fix}:\n{lines}")
    if bad:
        warnings.warn(f"skipped {len(bad)} unusable {_what(role)}:\n{lines}", stacklevel=3)
    return [r for r in reports if not r.error]


def _what(role: str) -> str:
    return "image(s)" if role == "image" else f"{role} image(s)"


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` (first frame of an animation) as an upright RGB image, fully decoded.

    Raises :class:`ImageIntakeError` naming the file and the fix when it cannot be used.
    """
    with quiet_bombs():  # MAX_PIXELS (Pillow's hard limit) decides, see inspect_image
        return decode_rgb(path)


def decode_rgb(path: str | Path) -> Image.Image:
    """:func:`load_rgb` without touching the warnings filter: for worker threads under :func:`quiet_bombs`."""
    try:
        with Image.open(path) as img:
            img.seek(0)
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        rep = _inspect(Path(path), None)  # only on failure: the fast path decodes once
        raise ImageIntakeError(f"{path}: {rep.error or f'{type(e).__name__}: {e}'}") from e


def caption_for(path: Path) -> str | None:
    """The per-image caption in ``photo.txt`` (or ``photo.caption``) beside ``photo.jpg``, if any."""
    for ext in CAPTION_EXTS:
        side = path.with_suffix(ext)
        if side.exists():
            try:
                text = side.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as e:
                raise ImageIntakeError(f"{side}: caption is not UTF-8 text ({e.reason} at byte {e.start}): save it "
                                       "as UTF-8.") from None
            if text:
                return text
    return None


def find_instance_images(instance_dir: str, num_instance_images: int | None, resolution: int,
                         strict: bool, mask: str = "off", mask_floor: float = 0.1) -> list[Path]:
    """The instance photos fit trains on: sorted, the first ``num_instance_images``, each checked (with its mask
    file unless ``mask`` is ``off``).

    Args:
        instance_dir, num_instance_images, resolution, mask, mask_floor: as for ``DreamBoothDataModule``.
        strict: ``data.strict_images``.
    """
    inst = list_images(instance_dir, "instance")
    if num_instance_images is not None:
        if len(inst) < num_instance_images:
            raise ImageIntakeError(f"instance dir {instance_dir!r} has {len(inst)} image(s) but "
                                   f"data.photos.num_images is {num_instance_images}: add photos or lower it.")
        inst = inst[:num_instance_images]
    if mask == "off":
        return check_images(inst, "instance", resolution, strict)
    from .masks import orphan_masks

    orphans = orphan_masks(instance_dir)
    if orphans:  # a renamed or deleted photo: its mask would silently do nothing
        lines = "\n".join(f"  {p}: no photo named {p.name[: -len(MASK_SUFFIX)]}.* beside it" for p in orphans)
        if strict:
            raise ImageIntakeError(f"{len(orphans)} mask file(s) have no photo — rename or remove them, or set "
                                   f"data.strict_images: false to ignore them:\n{lines}")
        warnings.warn(f"ignoring {len(orphans)} mask file(s) without a photo:\n{lines}", stacklevel=2)
    return check_images(inst, "instance", resolution, strict, mask_floor)
