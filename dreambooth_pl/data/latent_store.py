"""Latents kept on disk between runs (``data.latent_cache``): a later run on the same photos and class images reads
each image's latent moments instead of encoding it again (kohya sd-scripts' ``--cache_latents_to_disk``,
SimpleTuner's VAE cache). Ablations and a second subject of a class start without the VAE's encode (202 images
took 11.8 s of an H100 fit's start, BENCHMARKS.md 2026-12-06 session 4).

One entry is one image at one size in one orientation set, ``<content sha>-<h>x<w>-<p|pm>.safetensors``:
``mean``/``std`` ``[k, 4, h/8, w/8]`` and ``crop_top_left`` ``[k, 2]`` (k = 2 with the mirrored crop) and the image's
``original_size``. Plain and plain + mirrored are separate entries: the pair is one VAE batch, whose plain row
rounds unlike a batch of one. The image enters by its bytes, so a class image linked from the prior cache or a
renamed copy hits its entry, and an edited one misses. The entries live in a folder named by what else decides
the numbers: the VAE's weight files and config, its dtype, the float32 matmul precision and the algorithm modes
(deterministic, cuDNN's), the device (a GPU's name; a CPU's kernel family and thread count), torch's, cuDNN's,
torchvision's and Pillow's versions, one image per VAE call or the pair, and :data:`FORMAT` (the crop code's and
the file's layout). So latents read back equal a fresh encode there, and a resumed run stays exact. Files are read
through safetensors (no pickle) and checked; one that is not a valid entry is encoded again.

Rank 0 writes, atomically, from one background thread and without fsync (a torn entry reads as invalid and is
encoded again; a slow disk never holds up the cache); a store that cannot be written is skipped with one warning.
An entry is 0.5 MB per 1024² image (fp32 mean and std; 1 MB with the mirrored crop); nothing is evicted: deleting
the folder (or one key's subfolder) only costs the next run its encode. ``data.latent_cache: auto`` (the default)
keeps the store under :data:`LATENT_CACHE` for runs that encode on a GPU (:func:`latent_root`).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..sdxl import dtype_name
from .prior_cache import KeyedFolder, fingerprint

FORMAT = 1  # bump when transforms.prepare_image, encode._prepared or the stored tensors change
Size = tuple[int, int]
LATENT_CACHE = "~/.cache/dreambooth_pl/latents"  # data.latent_cache: auto's folder on a GPU, beside the prior cache


def latent_root(value: Optional[str], device: torch.device) -> Optional[str]:
    """The store's root for ``data.latent_cache``: ``auto`` is :data:`LATENT_CACHE` when the cache encodes on a GPU
    (where the encode is seconds of every start: 202 images took 10.6 s of an H200 fit's, and a second fit read them
    in 0.75 s; BENCHMARKS.md 2026-12-06 session 5) and off on a CPU; None is off; anything else is the folder."""
    if value == "auto":
        return LATENT_CACHE if device.type == "cuda" else None
    return value


def latent_key(vae_folder: str, vae: torch.nn.Module, one_per_call: bool, images_per_call: int = 1) -> dict:
    """What decides an image's latents besides its pixels, size and orientations (see the module docstring).

    Args:
        vae_folder: the VAE's local folder (the base's ``vae`` or ``model.vae_model``).
        vae: the VAE that encodes (its dtype and device).
        one_per_call: plain and mirrored in separate calls (``cache.Encoders.one_per_call``).
        images_per_call: images per VAE call (``cache.Encoders.images_per_call``): a batch rounds unlike one image
            (5e-5 relative on an H100), so a store is kept per count; one (the keys before it) names nothing.
    """
    import PIL
    import torchvision

    from ..fused_norms import is_nhwc, runs_fused

    param = next(vae.parameters())
    folder = Path(vae_folder).expanduser()
    configs = [folder / "config.json", folder / "vae" / "config.json"]
    kind = param.device.type
    # a GPU by its name; a CPU by its kernels (AVX-512 or AVX2) and its threads' split of a reduction
    device = torch.cuda.get_device_name(param.device) if kind == "cuda" else \
        f"cpu {torch.backends.cpu.get_cpu_capability()} x{torch.get_num_threads()}" if kind == "cpu" else kind
    return {"vae": fingerprint(vae_folder),
            "config": [hashlib.sha256(p.read_bytes()).hexdigest() for p in configs if p.is_file()],
            "dtype": dtype_name(param.dtype), "matmul": torch.get_float32_matmul_precision(),
            "device": device, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "one_per_call": bool(one_per_call),
            # the algorithm choices: Lightning's deterministic=True and cuDNN's modes pick other kernels
            "algorithms": [torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                           torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32],
            "format": FORMAT, **({"images_per_call": images_per_call} if images_per_call != 1 else {}),
            # the Triton GroupNorms (model.perf.fused_norms) round unlike PyTorch's, NHWC convolutions (their
            # channels_last) unlike NCHW ones; keys from before either name neither
            **({"fused_norms": True} if runs_fused(vae) else {}), **({"channels_last": True} if is_nhwc(vae) else {})}


class LatentStore(KeyedFolder):
    """One key's folder of latent entries.

    Args:
        root: the store's root (``data.latent_cache``; created on first write).
        key: :func:`latent_key`'s value.
        write: keep what is encoded (rank 0 only under DDP: every rank encodes the same images).
    """

    def __init__(self, root: str, key: dict, write: bool = True):
        super().__init__(root, key)
        self.write = write
        self.fused = bool(key.get("fused_norms"))  # the key names the Triton norms (see save)
        self.images_per_call = int(key.get("images_per_call", 1))  # encode_set encodes as the key says
        self.hits = self.misses = 0  # images read whole from the store / encoded
        self._writer = None  # one thread writes the entries: the cache's loop never waits for the disk
        self._pending: list = []

    @staticmethod
    def content_id(path: str | Path) -> str:
        """The image's identity in the store: the SHA-256 of its bytes (32 hex digits)."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:32]

    def _path(self, image_id: str, size: Size, mirrored: bool) -> Path:
        return self.folder / f"{image_id}-{size[0]}x{size[1]}-{'pm' if mirrored else 'p'}.safetensors"

    def lookup(self, image_id: str, sizes: list[Size], mirrored: bool):
        """``(original_size, {size: (mean, std, crop_top_left)})`` if every size is stored, else None.

        Args:
            image_id: :meth:`content_id` of the image.
            sizes: the sizes it trains at.
            mirrored: with the mirrored crop.
        """
        found, original = {}, None
        for size in sizes:
            got = self._read(self._path(image_id, size, mirrored), size, 2 if mirrored else 1)
            if got is None:
                self.misses += 1
                return None
            original, found[size] = got
        self.hits += 1
        return original, found

    @staticmethod
    def _read(path: Path, size: Size, k: int):
        """One entry's ``(original_size, (mean, std, crop_top_left))``, or None if it is missing or not a valid
        entry of this shape (a truncated write, a foreign file): it is encoded again and replaced."""
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        try:
            t = load_file(path)
            grid = (k, 4, size[0] // 8, size[1] // 8)
            ok = (t["mean"].shape == t["std"].shape == grid and t["mean"].dtype == t["std"].dtype == torch.float32
                  and t["crop_top_left"].shape == (k, 2) and t["original_size"].shape == (2,))
        except Exception:
            return None
        return (tuple(int(v) for v in t["original_size"]), (t["mean"], t["std"], t["crop_top_left"])) if ok else None

    def save(self, image_id: str, original: tuple[int, int], size: Size, mean: torch.Tensor, std: torch.Tensor,
             crop_top_left: torch.Tensor) -> None:
        """Keep one image's moments at ``size`` (CPU tensors; ``mean.shape[0]`` 2: with the mirrored crop), written
        by a background thread (:meth:`flush` waits); a store that cannot be written is skipped after one warning:
        the run has the latents."""
        from concurrent.futures import ThreadPoolExecutor

        from safetensors.torch import save

        from .. import fused_norms
        from ..io import write_bytes

        # the key was made before the encode: latents encoded after the kernels stopped are eager ones, which a later
        # run with working kernels must not read as fused (prior_cache's drawn_as_keyed, here)
        if not self.write or (self.fused and fused_norms.stopped()):
            return
        try:
            self.open()
        except OSError as err:
            return self._give_up(err)
        data = save({"mean": mean.contiguous(), "std": std.contiguous(), "crop_top_left": crop_top_left.contiguous(),
                     "original_size": torch.tensor(original, dtype=torch.int64)})
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-store")
        # no fsync: a torn entry is read as invalid and encoded again, and the rename keeps readers off partial files
        self._pending.append(self._writer.submit(write_bytes, self._path(image_id, size, mean.shape[0] == 2), data,
                                                 durable=False))

    def flush(self) -> None:
        """Wait for the entries being written; one warning if some could not be (a full disk)."""
        pending, self._pending = self._pending, []
        for done in pending:
            err = done.exception()
            if isinstance(err, OSError):
                if self.write:
                    self._give_up(err)
            elif err is not None:
                raise err
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None

    def _give_up(self, err: OSError) -> None:
        self.write = False
        warnings.warn(f"data.latent_cache: cannot write {self.folder} ({err}); this run's latents are not kept.",
                      stacklevel=3)


def open_store(value: Optional[str], vae_folder: str, vae: torch.nn.Module, one_per_call: bool,
               write: bool = True, images_per_call: int = 1) -> Optional[LatentStore]:
    """The store for this VAE and encode under ``data.latent_cache``'s root (:func:`latent_root`; None: off)."""
    root = latent_root(value, next(vae.parameters()).device)
    return None if root is None else LatentStore(root, latent_key(vae_folder, vae, one_per_call, images_per_call),
                                                 write)
