"""The class-prior cache: every image drawn is kept under a key of what decides its pixels, so a second run, or
another subject of the same class, links the images it needs instead of drawing them again.

The key is (base, VAE, prompt, negative prompt, sampler, steps, guidance, height, width, the UNet's storage
``base_dtype`` (a float8/NF4 base rounds its weights, so it draws other pixels), VAE tiling, compiled blocks and
the one-kernel GEGLU (Inductor's kernels round otherwise)); within a key's folder,
image ``<seed>.png`` is the one drawn from that seed. The base and VAE enter as fingerprints (resolved folder, and
each weight file's name, size and modification time), so a base rebuilt at the same path gets a new key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from ..io import read_json

PRIOR_CACHE = "~/.cache/dreambooth_pl/priors"  # the shared default (ClassImageSettings.cache_dir: null)
WEIGHTS = (".safetensors", ".bin")


def fingerprint(folder: Optional[str]) -> Optional[list]:
    """Resolved path plus (name, size, mtime) of every weight file under ``folder`` (None for None)."""
    if folder is None:
        return None
    root = Path(folder).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHTS and p.is_file())
    return [str(root)] + [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def vae_root(vae: Optional[str]) -> Optional[str]:
    """A separate VAE's local folder: the path as given when it exists (a VAE folder is no pipeline for
    ``resolve_base``), else the hub id resolved (None for None)."""
    if vae is None:
        return None
    from ..sdxl import resolve_base

    return vae if Path(vae).expanduser().exists() else resolve_base(vae)


class KeyedFolder:
    """A folder named by a key (16 hex digits of its JSON's SHA-256), with the key in words in its ``key.json``.

    Args:
        root: the parent folder (created on first :meth:`open`).
        key: what decides the folder's contents.
    """

    def __init__(self, root: str, key: dict):
        self._key_text = json.dumps(key, sort_keys=True)
        self.name = hashlib.sha256(self._key_text.encode()).hexdigest()[:16]
        self.folder = Path(root).expanduser() / self.name

    def open(self) -> None:
        """Create the folder and its ``key.json`` if missing (OSError where it cannot be written)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            from ..io import write_text

            write_text(key_file, self._key_text)


def native_size(root: str) -> int:
    """The side a pipeline draws when no size is given: the UNet's sample size times the VAE's downsampling."""
    unet = read_json(Path(root) / "unet" / "config.json", "base's UNet config", ("sample_size",))
    vae = read_json(Path(root) / "vae" / "config.json", "base's VAE config", ("block_out_channels",))
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def prior_key(base_root: str, vae: Optional[str], prompt: str, negative_prompt: Optional[str], scheduler: str,
              steps: int, guidance: float, height: int, width: int, base_dtype: str = "float16",
              vae_tiling: bool = False, compiled: bool = False, fused_geglu: bool = False,
              vae_direct: bool = False, constant_negative: bool = False,
              fused_norms: bool = False, channels_last: bool = False, vae_channels_last: bool = False,
              fp8_gemms: bool = False) -> dict:
    """What decides a prior image's pixels besides its seed (see the module docstring).

    Args:
        base_root: the base's local folder (``sdxl.resolve_base``).
        vae: a separate VAE folder, or None.
        prompt, negative_prompt, scheduler, steps, guidance, height, width: the sampling settings.
        base_dtype: the UNet's linears as drawn (``float16`` as loaded, ``float8``, ``nf4``: quant.py).
        vae_tiling: decoded in tiles (tile seams blend differently from one decode).
        compiled: drawn with compiled UNet blocks (``ClassImageSettings.compile_blocks``); entered only when true,
            so the keys of images drawn before the switch existed stay valid.
        fused_geglu: drawn with the one-kernel GEGLU (``prior_defaults.default_fused_geglu``: GPU draws since
            2026-12-06; it rounds once where diffusers' GEGLU rounds twice); entered only when true, likewise.
        vae_direct: the VAE read straight into its bf16 decode dtype (``prior_defaults.reads_vae_direct``: GPU
            draws since 2026-12-06 session 5; through fp16 before); entered only when true, likewise.
        constant_negative: guided by the zeroed negative prompt with its cross-attentions filled in as their
            constant (``PriorSampler``'s ``constant_negative``, draws since 2026-12-07: the positive half's GEMMs
            run at another row count); entered only when true, likewise.
        fused_norms: drawn with the Triton GroupNorms (fused_norms.py, GPU draws since 2026-12-07 session 8: the
            resnet's add, norm and SiLU round once); entered only when true, likewise.
        channels_last: drawn with the UNet in NHWC (other convolution kernels); entered only when true, likewise.
        vae_channels_last: decoded with the VAE in NHWC (draws since 2026-12-07 session 11); likewise.
        fp8_gemms: drawn with the transformers' linears as float8 GEMMs (fp8_gemm.py); likewise.
    """
    return {"base": fingerprint(base_root), "vae": fingerprint(vae_root(vae)), "prompt": prompt,
            "negative_prompt": negative_prompt, "scheduler": scheduler, "steps": int(steps),
            "guidance": float(guidance), "height": int(height), "width": int(width), "base_dtype": base_dtype,
            "vae_tiling": bool(vae_tiling), **({"compiled": True} if compiled else {}),
            **({"fused_geglu": True} if fused_geglu else {}), **({"vae_direct": True} if vae_direct else {}),
            **({"constant_negative": True} if constant_negative else {}),
            **({"fused_norms": True} if fused_norms else {}), **({"channels_last": True} if channels_last else {}),
            **({"vae_channels_last": True} if vae_channels_last else {}), **({"fp8_gemms": True} if fp8_gemms else {})}


class PriorCache(KeyedFolder):
    """One key's folder of the cache.

    Args:
        root: the cache's root folder (created on first use).
        key: :func:`prior_key`'s value.
    """

    def path(self, seed: int) -> Path:
        return self.folder / f"{int(seed)}.png"

    def has(self, seed: int) -> bool:
        return self.path(seed).is_file()

    def copy_to(self, seed: int, dest: Path) -> None:
        """Place the cached image of ``seed`` at ``dest`` (a hard link where the filesystem allows, else a copy)."""
        _link_or_copy(self.path(seed), dest)

    def keep(self, seed: int, image: Path) -> None:
        """Add a just-written image to the cache (a hard link, else a copy); a cache that cannot be written is
        skipped: the run's own image is what matters."""
        try:
            self.open()
            if not self.has(seed):
                _link_or_copy(image, self.path(seed))
        except OSError:
            pass


def _link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest``, or copy it beside ``dest`` and rename it into place (never a partial file)."""
    try:
        os.link(src, dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
