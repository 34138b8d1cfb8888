"""Latents kept on disk between runs (``data.latent_cache``): a later run on the same photos and class images reads
each image's latent moments instead of encoding it again (kohya sd-scripts' ``--cache_latents_to_disk``,
SimpleTuner's VAE cache). Ablations and a second subject of a class start without the VAE's encode (202 images
took 11.8 s of an H100 fit's start, BENCHMARKS.md 2026-12-06 session 4).

One entry is one image at one size, ``<content sha>-<h>x<w>.safetensors``: ``mean``/``std`` ``[k, 4, h/8, w/8]`` and
``crop_top_left`` ``[k, 2]`` (k = 2 with the mirrored crop) and the image's ``original_size``. The image enters by
its bytes, so a class image linked from the prior cache, a renamed photo or a copy hit the same entry, and an
edited one misses. The entries live in a folder named by what else decides the numbers: the VAE (its weight files'
fingerprint), its dtype, the device type (kernels round differently), one image per VAE call or the pair, and
:data:`FORMAT` (the crop's and the file's layout): latents read back equal the ones a fresh encode gives there, so
a resumed run is still exact. A plain entry cannot serve a run that flips (it is encoded again and replaced); a
mirrored one serves a plain run by its first row. Files are read through safetensors (no pickle) and written
atomically; one that cannot be read is encoded again, and a store that cannot be written is skipped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

FORMAT = 1  # bump when encode._prepared's crops or the stored tensors change
Size = tuple[int, int]


def latent_key(vae_folder: str, vae: torch.nn.Module, one_per_call: bool) -> dict:
    """What decides an image's latents besides its pixels and size (see the module docstring).

    Args:
        vae_folder: the VAE's local folder (the base's ``vae`` or ``model.vae_model``).
        vae: the VAE that encodes (its dtype and device).
        one_per_call: plain and mirrored in separate calls (``cache.Encoders.one_per_call``).
    """
    from .prior_cache import fingerprint

    param = next(vae.parameters())
    return {"vae": fingerprint(vae_folder), "dtype": str(param.dtype).removeprefix("torch."),
            "device": param.device.type, "one_per_call": bool(one_per_call), "format": FORMAT}


class LatentStore:
    """One key's folder of latent entries.

    Args:
        root: the store's root (``data.latent_cache``; created on first write).
        key: :func:`latent_key`'s value.
    """

    def __init__(self, root: str, key: dict):
        text = json.dumps(key, sort_keys=True)
        self.folder = Path(root).expanduser() / hashlib.sha256(text.encode()).hexdigest()[:16]
        self._key_text = text
        self.hits = self.misses = 0

    @staticmethod
    def content_id(path: str | Path) -> str:
        """The image's identity in the store: the SHA-256 of its bytes (32 hex digits)."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:32]

    def _path(self, image_id: str, size: Size) -> Path:
        return self.folder / f"{image_id}-{size[0]}x{size[1]}.safetensors"

    def lookup(self, image_id: str, sizes: list[Size], mirrored: bool):
        """``(original_size, {size: (mean, std, crop_top_left)})`` when every size is stored with the orientations
        ``mirrored`` asks for, else None (counted in :attr:`hits` / :attr:`misses`)."""
        from safetensors.torch import load_file

        found, original = {}, None
        for size in sizes:
            path = self._path(image_id, size)
            try:
                t = load_file(path) if path.is_file() else None
            except Exception:  # a truncated or foreign file: encoded again and replaced
                t = None
            if t is None or (mirrored and t["mean"].shape[0] < 2):
                self.misses += 1
                return None
            k = 2 if mirrored else 1
            found[size] = (t["mean"][:k], t["std"][:k], t["crop_top_left"][:k])
            original = tuple(int(v) for v in t["original_size"])
        self.hits += 1
        return original, found

    def save(self, image_id: str, original: tuple[int, int], size: Size, mean: torch.Tensor, std: torch.Tensor,
             crop_top_left: torch.Tensor) -> None:
        """Keep one image's moments at ``size`` (CPU tensors); an unwritable store is skipped: the run has them."""
        from safetensors.torch import save

        from ..io import write_bytes, write_text

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / "key.json").exists():
                write_text(self.folder / "key.json", self._key_text)
            write_bytes(self._path(image_id, size), save({
                "mean": mean.contiguous(), "std": std.contiguous(), "crop_top_left": crop_top_left.contiguous(),
                "original_size": torch.tensor(original, dtype=torch.int64)}))
        except OSError:
            pass


def open_store(root: Optional[str], vae_folder: str, vae: torch.nn.Module, one_per_call: bool) -> Optional[LatentStore]:
    """The store under ``root`` for this VAE and encode (None when ``root`` is None: ``data.latent_cache`` off)."""
    return None if root is None else LatentStore(root, latent_key(vae_folder, vae, one_per_call))
