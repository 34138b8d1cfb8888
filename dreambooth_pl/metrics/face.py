"""Face identity: whether a sample shows the subject's face, with dlib's face-recognition ResNet and real weights.

dlib (King 2009, JMLR 10) finds the largest frontal face with its HOG detector (Dalal & Triggs 2005), aligns it with
the 5-point shape predictor and maps it to a 128-D descriptor with its ResNet-34-style network (99.38% on LFW);
two faces are the same person when their descriptors are within Euclidean distance 0.6, dlib's calibrated
threshold. The two model files ship in the ``face-recognition-models`` package (CC0) and are read from where pip
installed it, or from a folder that holds them (``face_weights=DIR``); nothing is downloaded.

``face_sim`` is ``1 - distance``, so higher is more alike like CLIP-I and DINO, and the same-person threshold is
``face_sim >= 0.4``. CLIP and DINO score a sample that draws a generic face in the subject's clothes well; this
does not. Images without a detected face are counted (``face_none``), never an error.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchmetrics import Metric

from .embedders import EmbedderWeightsError, Images, to_pil

DLIB_FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
DLIB_DISTANCE = 0.6  # dlib's same-person threshold on the descriptor distance (dlib's face_recognition example)
SAME_PERSON = 1.0 - DLIB_DISTANCE  # the same threshold on face_sim = 1 - distance
DETECT_SIDE = 800  # faces are found on a copy this long: HOG time grows with pixels, a sample's face is large
_INSTALL = ("pip install -c constraints.txt dlib-bin face-recognition-models (README's install command brings "
            "both), or set face_weights to null to skip the face metric")


def dlib_model_dir(weights: str = "dlib") -> Path:
    """The folder holding dlib's two model files (``DLIB_FILES``), checked to contain both.

    Args:
        weights: ``dlib`` (the installed ``face-recognition-models`` package; its ``__init__`` is never imported,
            it needs ``pkg_resources``) or a folder with the two ``.dat`` files (e.g. copied to a GPU machine).
    """
    if weights == "dlib":
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise EmbedderWeightsError(f"face_weights=dlib needs the face-recognition-models package: {_INSTALL}.")
        folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    else:
        folder = Path(weights)
    missing = [f for f in DLIB_FILES if not (folder / f).is_file()]
    if missing:
        raise EmbedderWeightsError(f"face weights folder {str(folder)!r} lacks {', '.join(missing)}: give a folder "
                                   "holding both files of face-recognition-models' models/ folder, or 'dlib' for "
                                   "the installed package.")
    return folder


class DlibFaces:
    """Largest-face descriptors from dlib's HOG detector, 5-point alignment and ResNet (CPU; dlib-bin has no CUDA).

    Args:
        model_dir: folder with ``DLIB_FILES`` (:func:`dlib_model_dir`).
        upsample: image doublings before detection (1 finds faces down to about 40 px on the detection copy).
    """

    threshold = SAME_PERSON

    def __init__(self, model_dir: Path, upsample: int = 1):
        try:
            import dlib
        except ImportError as e:
            raise EmbedderWeightsError(f"the face metric needs dlib ({e}): {_INSTALL}.") from None
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(model_dir / DLIB_FILES[0]))
        self.resnet = dlib.face_recognition_model_v1(str(model_dir / DLIB_FILES[1]))
        self.upsample = upsample
        self.weights = str(model_dir)

    def embed(self, images: Images) -> list[Optional[np.ndarray]]:
        """The 128-D descriptor of each image's largest face, or None where no face is found.

        Args:
            images: see ``metrics.embedders.to_unit_float`` (PIL images, uint8 or [0, 1] float tensors).
        """
        out = []
        for img in to_pil(images):
            scale = min(1.0, DETECT_SIDE / max(img.size))
            if scale < 1.0:
                img = img.resize((round(img.width * scale), round(img.height * scale)), resample=3)  # bicubic
            pixels = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
            faces = self.detector(pixels, self.upsample)
            if len(faces) == 0:
                out.append(None)
                continue
            face = max(faces, key=lambda r: r.area())
            out.append(np.asarray(self.resnet.compute_face_descriptor(pixels, self.landmarks(pixels, face))))
        return out

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``1 - ||a_i - b_j||`` for every pair: ``[N, M]`` from ``[N, 128]`` and ``[M, 128]``."""
        return 1.0 - np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


@functools.lru_cache(maxsize=2)
def load_face(weights: str = "dlib") -> DlibFaces:
    """The face embedder of ``weights`` (``dlib`` or a folder with dlib's two files), loaded once per process."""
    return DlibFaces(dlib_model_dir(weights))


class FaceIdentity(Metric):
    """Face identity of samples against the subject's photos: ``face_sim``, ``face_match``, ``face_none``.

    Per sample with a face: its mean ``face_sim`` over the subject's photos that have a face, and whether that
    mean is within the same-person threshold. ``face_sim`` is averaged over samples with a face; ``face_match`` is
    the share of all samples (those without a face count as no match); ``face_none`` counts samples without one.
    ``compute`` returns ``{}`` when no photo of the subject has a face (a non-person subject: meaningless).

    Args:
        embedder: a :class:`DlibFaces` (None: :func:`load_face` of ``weights``).
        reference: the subject's photos; embedded once (or later with :meth:`set_reference`).
        weights: ``dlib`` or a folder with dlib's two files, when ``embedder`` is None.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, embedder: Optional[DlibFaces] = None, reference: Optional[Images] = None,
                 weights: str = "dlib", **kwargs):
        super().__init__(**kwargs)
        self.embedder = embedder or load_face(weights)
        for name, dtype in (("sim_total", torch.float64), ("faces", torch.long), ("matched", torch.long),
                            ("no_face", torch.long), ("images", torch.long)):
            self.add_state(name, torch.tensor(0, dtype=dtype), dist_reduce_fx="sum")
        self.reference: Optional[np.ndarray] = None
        self.reference_rows: list[int] = []  # position in the subject's photos of each reference face
        self.reference_missing = 0
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, images: Images) -> None:
        """Embed the subject's photos that every later update is compared with; photos without a face are left out
        (counted in ``reference_missing``)."""
        found = self.embedder.embed(images)
        self.reference_rows = [i for i, e in enumerate(found) if e is not None]
        self.reference_missing = len(found) - len(self.reference_rows)
        self.reference = np.stack([found[i] for i in self.reference_rows]) if self.reference_rows else None

    def update(self, images: Images, reference_index: Optional[torch.Tensor] = None) -> None:
        """Score ``images`` against the subject's photos.

        Args:
            images: generated images (or the subject's photos, for the real-vs-real baseline).
            reference_index: per image, its own position in the subject's photos, or -1; that pair (a face with
                itself) is left out, as ``ImageSimilarity`` does for the "real images" row.
        """
        found = self.embedder.embed(images)
        index = [-1] * len(found) if reference_index is None else [int(i) for i in reference_index]
        if len(index) != len(found):
            raise ValueError(f"reference_index needs one entry per image ({len(found)}), got {len(index)}")
        self.images += len(found)
        for emb, own in zip(found, index):
            if emb is None:
                self.no_face += 1
                continue
            if self.reference is None:
                continue
            sims = self.embedder.similarity(emb[None], self.reference)[0]
            keep = np.array([row != own for row in self.reference_rows])
            if not keep.any():  # the subject's only face is this image itself
                continue
            mean = float(sims[keep].mean())
            self.faces += 1
            self.sim_total += mean
            self.matched += int(mean >= self.embedder.threshold)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.reference is None:
            return {}
        out = {"face_match": (self.matched.double() / self.images.clamp(min=1)).float(), "face_none": self.no_face}
        if self.faces:
            out["face_sim"] = (self.sim_total / self.faces).float()
        return out


def face_scores(images: Images, real: Images, embedder: Optional[DlibFaces],
                reference_index: Optional[torch.Tensor] = None) -> dict:
    """``face_sim``, ``face_match``, ``face_none`` of ``images`` against ``real`` as plain numbers; ``{}`` without
    an embedder or when no photo in ``real`` has a face.

    Args:
        images: the images to score.
        real: the subject's photos.
        embedder: a :class:`DlibFaces`, or None (face metric off).
        reference_index: see :meth:`FaceIdentity.update`.
    """
    if embedder is None:
        return {}
    metric = FaceIdentity(embedder, real)
    metric.update(images, reference_index)
    return {k: int(v) if k == "face_none" else float(v) for k, v in metric.compute().items()}
