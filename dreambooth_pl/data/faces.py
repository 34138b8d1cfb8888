"""Face-aware crops and loss masks: OpenCV's bundled Haar cascade (Viola & Jones 2001) finds the subject's face,
so ``data.crops.around: face`` centres the training crop on it and ``data.masks.source: face`` weights the loss by a
face ellipse.

The cascade ships inside ``opencv-python-headless`` (``cv2.data.haarcascades``): nothing is downloaded.
A mask file ``photo.mask.png`` beside ``photo.jpg`` (white: weight 1, black: ``data.masks.floor``) wins over the
automatic ellipse.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .images import MASK_SUFFIX

CASCADE = "haarcascade_frontalface_default.xml"
DETECT_SIDE = 640  # detect on a copy this long: phone photos are 12 MP, the cascade needs ~30 px faces
Box = tuple[int, int, int, int]  # (left, top, width, height) in the upright image's pixels


@lru_cache(maxsize=1)
def _cascade():
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise ImportError(f"OpenCV {cv2.__version__} has no CascadeClassifier (OpenCV 5 moved Haar cascades out): "
                          "pip install 'opencv-python-headless<5' (constraints.txt pins it).")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if cascade.empty():
        raise OSError(f"OpenCV could not load its bundled {CASCADE} from {cv2.data.haarcascades}: reinstall "
                      "opencv-python-headless.")
    return cascade


def detect_face(img: Image.Image) -> Box | None:
    """The largest frontal face in ``img`` (upright RGB), or None.

    Args:
        img: the image as training loads it (EXIF-rotated RGB).
    """
    scale = min(1.0, DETECT_SIDE / max(img.size))
    small = img.convert("L")
    if scale < 1.0:
        small = small.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    side = max(24, min(small.size) // 10)  # faces under a tenth of the short side are background people
    found = _cascade().detectMultiScale(np.asarray(small), scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    if len(found) == 0:
        return None
    x, y, w, h = max(found, key=lambda b: int(b[2]) * int(b[3]))
    return tuple(round(float(v) / scale) for v in (x, y, w, h))


def face_centre(box: Box, size: tuple[int, int]) -> tuple[float, float]:
    """Centre of ``box`` as fractions ``(x, y)`` of an image of ``size`` (w, h): independent of resizing."""
    x, y, w, h = box
    return (x + w / 2) / size[0], (y + h / 2) / size[1]


def face_ellipse(box: Box, size: tuple[int, int], grow: float = 1.4) -> Image.Image:
    """An ``L`` mask of ``size`` (w, h): white inside an ellipse around ``box`` (grown to take in hair and chin)."""
    x, y, w, h = box
    cx, cy, rx, ry = x + w / 2, y + h / 2, grow * w / 2, grow * 1.2 * h / 2  # faces are taller than the box
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return mask


def mask_file(path: Path) -> Path | None:
    """``photo.mask.png`` beside ``photo.jpg``, if present."""
    side = path.with_name(path.stem + MASK_SUFFIX)
    return side if side.exists() else None


def uses_masks(paths, mode: str) -> bool:
    """Whether examples carry loss masks: ``face`` always, ``files`` when any photo has a mask file."""
    return mode == "face" or (mode == "files" and any(mask_file(Path(p)) for p in paths))


def load_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A mask file as an ``L`` image; refused by name when its size differs from its photo's."""
    with Image.open(path) as m:
        m = m.convert("L")
    if m.size != size:
        raise ValueError(f"mask {str(path)!r} is {m.size[0]}x{m.size[1]} but its photo is {size[0]}x{size[1]}: "
                         "save the mask at the photo's (upright) size.")
    return m


def weights_from_mask(mask, floor: float):
    """Per-pixel loss weights ``floor + (1 - floor) * mask`` from a mask tensor in [0, 1]."""
    return floor + (1.0 - floor) * mask
