"""Frozen image/text embedders of the DreamBooth metrics: CLIP ViT-B/32 (open_clip) and DINO ViT-S/16 (timm).

Input convention (checked by :func:`to_unit_float`): images are PIL images, or tensors ``[B, 3, H, W]`` /
``[3, H, W]`` that are either ``uint8`` in [0, 255] or floating point in [0, 1]. Floats outside [0, 1] (0-255 floats,
or [-1, 1] VAE-range pixels) are rejected with the fix, never silently rescaled. Every image then reaches its model
as a PIL image through the library's own PIL transform (PIL bicubic resize, centre crop, normalise): open_clip's
eval transform for CLIP, and DINO's evaluation transform (resize the short side to 256, centre crop 224; Caron et
al. 2021, ``eval_linear.py``) built by timm. Tensors become 8-bit PIL images first (uint8 exactly; floats rounded
to the nearest 8-bit level, as saving them as PNG would), so a tensor and its PIL image embed identically.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path
from typing import Callable, Sequence, Union
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

Images = Union[torch.Tensor, Sequence[Image.Image], Sequence[torch.Tensor]]
CLIP_ARCH = "ViT-B-32"
DINO_ARCH = "vit_small_patch16_224.dino"
DINO_EVAL_RESIZE = 256  # DINO's eval_linear.py / eval_knn.py: Resize(256, bicubic) then CenterCrop(224)
_RANGE_TOL = 1e-3  # bicubic resampling in generators can overshoot [0, 1] by float noise
MEMO_SIZE = 4096  # embeddings an embedder keeps (a few KB each); past it the memo starts over


class EmbedderWeightsError(RuntimeError):
    """The metric model's weights cannot be found or loaded; the message names them and how to give a local file."""


def to_unit_float(images: Images) -> list[torch.Tensor]:
    """Images as a list of float ``[3, H, W]`` tensors in [0, 1], checking the documented input convention.

    Args:
        images: PIL images, a ``uint8`` tensor in [0, 255], or a float tensor in [0, 1] (batched or a list).
    """
    if isinstance(images, (Image.Image, torch.Tensor)) and not (isinstance(images, torch.Tensor) and images.ndim == 4):
        images = [images]
    out = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        elif isinstance(img, torch.Tensor):
            t = img
        else:
            raise TypeError(f"image {i}: expected a PIL image or a torch tensor, got {type(img).__name__}")
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image {i}: expected shape [3, H, W] (channels first, RGB), got {list(t.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif t.is_floating_point():
            lo, hi = float(t.min()), float(t.max())
            if hi > 1 + _RANGE_TOL:
                raise ValueError(f"image {i}: float pixels up to {hi:.3g} look like the 0-255 range; the metrics take "
                                 "floats in [0, 1] or uint8 in [0, 255]: pass x / 255 or x.round().to(torch.uint8).")
            if lo < -_RANGE_TOL:
                raise ValueError(f"image {i}: float pixels down to {lo:.3g} look like [-1, 1] (VAE range); the "
                                 "metrics take floats in [0, 1]: pass (x + 1) / 2.")
            t = t.float().clamp(0, 1)
        else:
            raise TypeError(f"image {i}: dtype {t.dtype} is neither uint8 nor floating point")
        out.append(t)
    return out


def to_pil(images: Images) -> list[Image.Image]:
    """Images as RGB PIL images, after :func:`to_unit_float`'s checks; PIL inputs pass through unchanged.

    Args:
        images: see :func:`to_unit_float`.
    """
    if isinstance(images, (Image.Image, torch.Tensor)) and not (isinstance(images, torch.Tensor) and images.ndim == 4):
        images = [images]
    out = []
    for img in images:
        if isinstance(img, Image.Image):
            out.append(img.convert("RGB"))
            continue
        unit = to_unit_float([img])[0]  # the range checks, naming the fix
        u8 = img if img.dtype == torch.uint8 else (unit * 255).round().to(torch.uint8)
        out.append(Image.fromarray(u8.permute(1, 2, 0).cpu().numpy()))
    return out


class _Embedder(torch.nn.Module):
    """A frozen model plus its own eval preprocessing; returns L2-normalised embeddings."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, weights: str | None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.weights = weights

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: Images) -> torch.Tensor:
        """Preprocessed batch ``[B, 3, 224, 224]`` on the model's device (the library's PIL transform)."""
        return torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device)

    def _encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Images, batch_size: int = 32) -> torch.Tensor:
        """Unit-norm image embeddings ``[B, D]`` (float32). An image whose preprocessed pixels this embedder has
        embedded before is not run again: one evaluation compares the same real photos in CLIP-I, DINO, PRES and
        the real-vs-real row, and scores each sample in two metrics per model (the key is the pixels' bytes, so
        equal keys are equal model inputs; the model is per-image, so the batch it ran in does not matter beyond
        float rounding).

        Args:
            images: see :func:`to_unit_float`.
            batch_size: images per forward pass.
        """
        pixels = [self.preprocess(im) for im in to_pil(images)]
        keys = [hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest() for x in pixels]
        # the memo holds for these weights only: new values (load_state_dict bumps each tensor's version), another
        # dtype or device (new tensors) start it over
        weights = tuple((p.data_ptr(), p._version, p.dtype) for p in self.model.parameters())
        memo = self.__dict__.get("_memo")  # key -> CPU embedding; not module state (state_dict, .to())
        if memo is None or self.__dict__.get("_memo_weights") != weights or len(memo) > MEMO_SIZE:
            memo = {}
            self.__dict__.update(_memo=memo, _memo_weights=weights)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        got = {k: memo[k] for k in first if k in memo}
        new = [k for k in first if k not in got]
        for i in range(0, len(new), batch_size):
            chunk = new[i:i + batch_size]
            x = torch.stack([pixels[first[k]] for k in chunk]).to(self.device)
            got.update(zip(chunk, torch.nn.functional.normalize(self._encode_pixels(x).float(), dim=-1).cpu()))
        memo.update(got)
        return torch.stack([got[k] for k in keys]).to(self.device)


class CLIPEmbedder(_Embedder):
    """CLIP ViT-B/32 (Radford et al. 2021) image and text towers, as the DreamBooth paper's CLIP-I / CLIP-T use."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, weights: str | None):
        super().__init__(model, preprocess, weights)
        self.tokenizer = tokenizer

    def _encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[B, D]`` (float32) of ``prompts``."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


class DINOEmbedder(_Embedder):
    """DINO ViT-S/16 (Caron et al. 2021) CLS-token embeddings, as the DreamBooth paper's DINO metric uses."""

    def _encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # num_classes=0: the pooled CLS token


def _fail(arch: str, weights: str, how: str, err: Exception) -> EmbedderWeightsError:
    reason = str(err).splitlines()[0][:200] if str(err) else ""
    return EmbedderWeightsError(f"could not load {arch} weights {weights!r} ({type(err).__name__}: {reason}). "
                                f"Offline machines need a local copy: {how}")


@contextlib.contextmanager
def _hub_fail_fast():
    """Hub offline mode while the hub's host does not answer: the client would otherwise retry for a minute per
    file before failing; cached weights still load."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    if not saved:
        host = urlsplit(constants.ENDPOINT)
        try:
            socket.create_connection((host.hostname, host.port or 443), timeout=3).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_clip(weights: str | None = "openai", device: str | torch.device = "cpu") -> CLIPEmbedder:
    """CLIP ViT-B/32 with open_clip's preprocessing and tokenizer.

    Args:
        weights: open_clip pretrained tag (``openai``), a local checkpoint file (e.g. ``ViT-B-32.pt`` or
            ``open_clip_pytorch_model.bin``), or None for random weights (tests).
        device: where the model runs.
    """
    import open_clip

    how = ("download open_clip_pytorch_model.bin from the hub repo timm/vit_base_patch32_clip_224.openai (or OpenAI's "
           "ViT-B-32.pt) where the network is reachable and pass its path as the CLIP weights (clip_weights=PATH).")
    if weights is not None and os.path.sep in weights and not Path(weights).is_file():
        raise EmbedderWeightsError(f"CLIP weights file {weights!r} does not exist. {how}")
    try:  # QuickGELU is the OpenAI ViT-B/32 activation; forced so a local file of those weights loads right too
        with _hub_fail_fast():
            model, _, preprocess = open_clip.create_model_and_transforms(CLIP_ARCH, pretrained=weights,
                                                                         force_quick_gelu=True, device=device)
    except Exception as e:  # hub unreachable, offline mode, corrupt or mismatched file
        raise _fail(f"CLIP {CLIP_ARCH}", str(weights), how, e) from None
    return CLIPEmbedder(model, preprocess, open_clip.get_tokenizer(CLIP_ARCH), weights)


def load_dino(weights: str | None = "dino", device: str | torch.device = "cpu") -> DINOEmbedder:
    """DINO ViT-S/16 (timm ``vit_small_patch16_224.dino``) with DINO's evaluation preprocessing, built by timm.

    Args:
        weights: ``dino`` (timm's pretrained tag, from the hub), a local file (timm's ``model.safetensors`` or
            Facebook's ``dino_deitsmall16_pretrain.pth``), or None for random weights (tests).
        device: where the model runs.
    """
    import timm

    how = ("download model.safetensors from the hub repo timm/vit_small_patch16_224.dino (or "
           "dino_deitsmall16_pretrain.pth from dl.fbaipublicfiles.com) where the network is reachable and pass its "
           "path as the DINO weights (dino_weights=PATH).")
    if weights not in (None, "dino") and not Path(weights).is_file():
        raise EmbedderWeightsError(f"DINO weights file {weights!r} does not exist. {how}")
    kwargs = {} if weights in (None, "dino") else {"pretrained_cfg_overlay": {"file": weights}}
    try:
        with _hub_fail_fast():
            model = timm.create_model(DINO_ARCH, pretrained=weights is not None, **kwargs).to(device)
    except Exception as e:
        raise _fail(f"DINO {DINO_ARCH}", str(weights), how, e) from None
    config = timm.data.resolve_data_config({}, model=model)  # timm's default crop_pct 0.9 resizes to 248, not DINO's
    config["crop_pct"] = config["input_size"][-1] / DINO_EVAL_RESIZE
    return DINOEmbedder(model, timm.data.create_transform(**config, is_training=False), weights)
