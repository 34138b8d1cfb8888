"""The class-prior set of DreamBooth (Ruiz et al. 2023, sec. 3.3): the base draws N images of the class prompt.

Image ``class_%05d.png`` number i always has seed ``seed + i``; a rerun counts the images already there and draws
only the missing ones (never overwriting a file), and each PNG is renamed into place only when complete. Images
the prior cache holds for the same settings (data/prior_cache.py) are linked instead of drawn.
``manifest.json`` beside the images records prompt, seed, scheduler, steps, guidance and base of every image, whether
it was drawn or came from the cache, and how many of each the last run had.
Both the ``generate-class-images`` verb and the DataModule (``data.priors.generate``) call
:func:`draw_class_images`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from ..sampling import SAMPLER, SamplerSettings

MANIFEST = "manifest.json"
NUM_CLASS_IMAGES = 200  # the paper's and diffusers' default size of the prior set


@dataclasses.dataclass
class ClassImageSettings:
    """How class images are drawn.

    Args:
        sampler: scheduler, steps, guidance and negative prompt (``sampling.SamplerSettings``).
        resolution: image side in pixels (None: the base's native size; fit uses ``data.resolution``).
        batch_size: images per UNet batch (None: 8 on a GPU with at least 40 GiB, else 4); every full batch has
            this shape, so one CUDA graph serves them all, and a short last one runs eagerly (prior_sampler.py).
        seed: seed of image 0 (image i uses ``seed + i``).
        cache: keep every image drawn in the prior cache and link cached ones instead of drawing them
            (data/prior_cache.py).
        cache_dir: the cache's folder (None: ``~/.cache/dreambooth_pl/priors``, shared by every run and subject).
        base_dtype: storage of the UNet's linears while drawing (quant.py): ``float16`` as loaded, ``float8`` or
            ``nf4`` to draw on a small GPU (loaded on the CPU first, so the full base never sits on the GPU). The
            rounded base draws other pixels: it is part of the prior cache's key.
        vae_tiling: decode in tiles (a 1024² fp32 decode otherwise needs ~2 GiB beside the resident models).
        compile_blocks: compile the UNet's transformer and resnet blocks while drawing (prior_sampler.py): the
            first batch pays the compile. Inductor's kernels round differently from eager ones, so it is part of
            the prior cache's key.
        park_text_encoders: keep the text encoders on the CPU except while they encode the prompt (prior_sampler.py),
            so the denoising peak holds the UNet and VAE only (an 8 GB card); the images do not change.
        fused_geglu: run each GEGLU as two GEMMs and one compiled activation (None: on a GPU with Triton and an
            fp16 base, ``prior_defaults.default_fused_geglu``). It rounds once where diffusers rounds twice, so it
            is part of the prior cache's key: ``false`` keeps reusing class images drawn before it was the default.
        constant_negative: with no negative prompt, fill the zeroed negative prompt's cross-attentions in as the
            constant they are instead of computing them (zero_negative.py; ~3.5 % of a guided step's FLOPs). Its
            GEMMs see half the rows, so it is part of the prior cache's key: ``false`` keeps reusing class images
            drawn before it was the default (2026-12-07).
        fused_norms: run the UNet's and VAE's GroupNorms, with each resnet's ``+ temb`` before and SiLU after, as
            Triton kernels (fused_norms.py; None: on a GPU with Triton and no compiled blocks). They round once where
            diffusers rounds at each step, so it is part of the prior cache's key.
        channels_last: draw with the UNet in NHWC (cuDNN's Hopper convolutions' layout; the fused norms keep it;
            None: on a GPU where the fused norms run). Other kernels round differently, so it is part of the prior
            cache's key.
        fp8_gemms: the UNet transformers' linears as row-wise scaled float8 GEMMs while drawing (fp8_gemm.py; a GPU
            of compute capability 8.9+: Ada, Hopper): faster, but other images of the prompt than the half-precision
            draw's, so it is part of the prior cache's key.
        warm_kernels: build the draw's Triton kernels several at once before its first batch instead of one by one
            at their first launch (kernel_warmup.py; the same kernels run, so not part of the key).
    """

    sampler: SamplerSettings = SAMPLER
    resolution: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    cache: bool = True
    cache_dir: Optional[str] = None
    base_dtype: Literal["float16", "float8", "nf4"] = "float16"
    vae_tiling: bool = False
    compile_blocks: bool = False
    park_text_encoders: bool = False
    fused_geglu: Optional[bool] = None
    constant_negative: bool = True
    fused_norms: Optional[bool] = None
    channels_last: Optional[bool] = None
    warm_kernels: bool = True
    fp8_gemms: bool = False


def fuses_norms(s: ClassImageSettings, device) -> bool:
    """Whether the sampler of ``s`` on ``device`` runs the Triton GroupNorms (the prior cache keys on it)."""
    from ..prior_defaults import fused_norms_for

    return fused_norms_for(s.fused_norms, device, s.compile_blocks)


def draws_nhwc(s: ClassImageSettings, device) -> bool:
    """Whether the sampler of ``s`` on ``device`` draws with the UNet in NHWC (the prior cache keys on it)."""
    from ..prior_defaults import channels_last_for

    return channels_last_for(s.channels_last, device, fuses_norms(s, device))


def draws_fp8(s: ClassImageSettings, device) -> bool:
    """Whether the sampler of ``s`` on ``device`` runs float8 GEMMs (fp8_gemm.py; the prior cache keys on it)."""
    from ..prior_defaults import fp8_gemms_for

    return fp8_gemms_for(s.fp8_gemms, device, s.base_dtype)


def fuses_geglu(s: ClassImageSettings, device) -> bool:
    """Whether the sampler of ``s`` on ``device`` runs the one-kernel GEGLU (the prior cache keys on it)."""
    from ..prior_defaults import fused_geglu_for

    return fused_geglu_for(s.fused_geglu, device, s.compile_blocks, s.base_dtype)


def guides_with_constant_negative(s: ClassImageSettings) -> bool:
    """Whether a draw of ``s`` fills the zeroed negative prompt's cross-attentions in as their constant (no negative
    prompt, guidance on, the switch on: zero_negative.py); the prior cache keys on it and the PNGs record it."""
    g = s.sampler
    return s.constant_negative and g.negative_prompt is None and g.guidance > 1


def as_class_image_settings(value) -> ClassImageSettings:
    """``value`` as :class:`ClassImageSettings`: None gives the defaults; a dict (what the CLI and a run's saved
    config hand over) is built, its ``sampler`` too."""
    if value is None or isinstance(value, ClassImageSettings):
        return value or ClassImageSettings()
    given = dict(value)
    if isinstance(given.get("sampler"), dict):
        given["sampler"] = SamplerSettings(**given["sampler"])
    return ClassImageSettings(**given)


_DRAWN: dict[str, tuple[int, int, int]] = {}  # PNGs this process drew: resolved path -> (bytes, mtime_ns, short side)


def _remember(path: Path, short_side: int) -> None:
    st = path.stat()
    _DRAWN[str(path.resolve())] = (st.st_size, st.st_mtime_ns, short_side)


def drawn_here(path, resolution: Optional[int] = None) -> bool:
    """Whether ``path`` is a PNG this process drew and wrote, unchanged since (bytes and mtime as written), at least
    ``resolution`` on its short side: a fit's image check need not decode its own fresh priors again (~1.3 s for
    197 at 1024², BENCHMARKS.md); smaller ones are checked, which says what training does with them."""
    key = str(Path(path).resolve())
    if key not in _DRAWN:
        return False
    try:
        st = Path(path).stat()
    except OSError:
        return False
    size, mtime, side = _DRAWN[key]
    return (size, mtime) == (st.st_size, st.st_mtime_ns) and side >= (resolution or 0)


def missing_indices(folder: Path, num: int) -> list[int]:
    """Indices to draw: as many as ``num`` minus the images present, skipping names that already exist."""
    from .images import IMAGE_EXTS

    present = {p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")}
    todo, i = [], 0
    while len(todo) < num - len(present):
        if f"class_{i:05d}.png" not in present:
            todo.append(i)
        i += 1
    return todo


def _batch_size(given: Optional[int], device: Optional[str]) -> int:
    """``given``, or 8 on a GPU with at least 40 GiB (an 80 GB-class card), else 4 (fits a 16 GB card)."""
    import torch

    if given is not None:
        return given
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    big = dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory >= 40 * 2**30
    return 8 if big else 4


def draw_class_images(base: str, prompt: str, out: str, num: int = NUM_CLASS_IMAGES,
                      settings: Optional[ClassImageSettings] = None, dtype: Optional[str] = None,
                      device: Optional[str] = None, vae: Optional[str] = None, progress: bool = True,
                      leave_base: bool = False) -> str:
    """Fill ``out`` with class images of ``prompt`` until it holds ``num``: linked from the prior cache where it
    has them, drawn by :class:`~dreambooth_pl.prior_sampler.PriorSampler` otherwise; returns a one-line report.

    Args:
        base: SDXL pipeline folder or hub id.
        prompt: class prompt, e.g. ``a photo of dog``.
        out: class image folder (created if missing).
        num: images the folder must hold.
        settings: sampler, size, batch, seed and cache of the images (None: the defaults).
        dtype: weights dtype (None: bf16 where the GPU has it, fp16 on other GPUs, fp32 on a CPU).
        device: cuda, cpu, ... (None: CUDA when available).
        vae: separate VAE folder.
        progress: show a progress bar.
        leave_base: once drawn, leave the loaded base for the next ``sdxl.load_parts`` of it (base_handoff.py): a
            fit's training takes it instead of reading the files again.
    """
    from ..io import clean_stale_temps, ensure_writable, read_json, write_json
    from ..sampling import check_size
    from ..sdxl import resolve_base
    from ..prior_defaults import reads_vae_direct, sampler_device
    from .prior_cache import PRIOR_CACHE, PriorCache, native_size, prior_key

    s = settings or ClassImageSettings()
    g = s.sampler
    check_size(s.resolution, s.resolution)
    folder = ensure_writable(out)
    clean_stale_temps(folder)  # images a killed draw was writing
    manifest_path = folder / MANIFEST
    manifest = read_json(manifest_path, "class-image manifest", ("images",)) if manifest_path.exists() else {}
    manifest.setdefault("images", {})
    if manifest.get("prompt", prompt) != prompt:
        raise ValueError(f"class dir {str(folder)!r} holds images of prompt {manifest['prompt']!r}, not "
                         f"{prompt!r}: use another folder (class images of two prompts must not mix).")
    manifest["prompt"] = prompt
    todo = missing_indices(folder, num)
    if not todo:
        return f"{folder}: {num} class image(s) present, nothing to do"
    root = resolve_base(base)
    size = s.resolution or native_size(root)
    dev = sampler_device(device)
    nhwc = draws_nhwc(s, dev)  # the UNet's layout, and the VAE's with it
    key = prior_key(root, vae, prompt, g.negative_prompt, g.scheduler, g.steps, g.guidance, size, size,
                    s.base_dtype, s.vae_tiling, s.compile_blocks, fuses_geglu(s, dev),
                    reads_vae_direct(dev, dtype, None, s.base_dtype, s.park_text_encoders),
                    constant_negative=guides_with_constant_negative(s), fused_norms=fuses_norms(s, dev),
                    channels_last=nhwc, vae_channels_last=nhwc, fp8_gemms=draws_fp8(s, dev))
    cache = PriorCache(s.cache_dir or PRIOR_CACHE, key) if s.cache else None
    record = dict(scheduler=g.scheduler, steps=g.steps, guidance=g.guidance, base=base, height=size, width=size,
                  negative_prompt=g.negative_prompt, base_dtype=s.base_dtype)
    reused = [i for i in todo if cache is not None and cache.has(s.seed + i)]
    for i in reused:
        cache.copy_to(s.seed + i, folder / f"class_{i:05d}.png")
        manifest["images"][f"class_{i:05d}.png"] = dict(record, seed=s.seed + i, source="prior cache",
                                                         prior_key=cache.name)
    drawn = [i for i in todo if i not in set(reused)]
    manifest.pop("timing", None)  # the drawing's own timing, when this run draws
    if drawn:
        _draw(base, prompt, folder, drawn, s, size, dtype, device, vae, cache, record, manifest, progress,
              leave_base)
    manifest["last_run"] = {"drawn": len(drawn), "reused": len(reused),
                            "cache": str(cache.folder) if cache is not None else None}
    write_json(manifest_path, manifest)
    return (f"{folder}: generated {len(drawn)} class image(s), reused {len(reused)} from the prior cache, "
            f"{num} present")


def _draw(base, prompt, folder: Path, indices: list[int], s: ClassImageSettings, size: int, dtype, device, vae,
          cache, record: dict, manifest: dict, progress: bool, leave_base: bool) -> None:
    """Draw the images of ``indices`` batch by batch; PNGs are encoded and written by background threads while
    the GPU draws the next batch, and the manifest is written once a batch's files are all on disk."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from ..io import write_json, write_png
    from ..prior_sampler import PriorSampler

    import time

    start = time.perf_counter()
    g = s.sampler
    sampler = PriorSampler(base, g.scheduler, dtype, device, vae, _batch_size(s.batch_size, device),
                           base_dtype=s.base_dtype, vae_tiling=s.vae_tiling, compile_blocks=s.compile_blocks,
                           park_text_encoders=s.park_text_encoders, fused_geglu=s.fused_geglu,
                           constant_negative=s.constant_negative, fused_norms=s.fused_norms,
                           channels_last=s.channels_last, warm_kernels=s.warm_kernels, fp8_gemms=s.fp8_gemms)
    timing = {"load_s": time.perf_counter() - start}
    meta_base = dict(base=base, vae=vae, loras=[], scheduler=g.scheduler, steps=g.steps, guidance=g.guidance,
                     negative_prompt=g.negative_prompt, **sampler.runtime())
    # whether the negative half's cross-attentions were the constant (as the prior cache's key says)
    meta_base["constant_negative"] = guides_with_constant_negative(s) and meta_base["constant_negative_layers"] > 0
    by_seed = {s.seed + i: i for i in indices}

    def drawn_as_keyed() -> bool:
        # a Triton kernel that failed mid-draw leaves the rest to eager ops, which the key does not describe: those
        # images stay in the class folder and out of the shared cache
        from .. import block_ops, fused_norms

        ran = sampler.speedups
        return not ((ran.fused_geglu and block_ops._kernel_failed)
                    or (ran.fused_norms and fused_norms.stopped())
                    or (draws_fp8(s, sampler.device) and not ran.fp8_gemms))  # keyed float8, none swapped

    def write(i: int, image) -> None:
        path = folder / f"class_{i:05d}.png"
        write_png(path, image, dict(meta_base, prompt=prompt, seed=s.seed + i, height=image.height,
                                    width=image.width))
        _remember(path, min(image.size))
        if cache is not None and drawn_as_keyed():
            cache.keep(s.seed + i, path)

    def settle(batch: list) -> None:  # a batch's files are on disk: record them (an interrupted run keeps its record)
        for j, done in batch:
            done.result()  # a failed write stops the run here, with its own error
            manifest["images"][f"class_{j:05d}.png"] = dict(record, seed=s.seed + j, source="drawn",
                                                             prior_key=cache.name if cache else None)
        write_json(folder / MANIFEST, manifest)

    current: list = []
    previous: list = []
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=len(indices), desc=f"class images -> {folder}", disable=not progress) as bar:
        for n, (seed, image) in enumerate(sampler.images(prompt, list(by_seed), g.steps, g.guidance,
                                                         g.negative_prompt, size, size), 1):
            current.append((by_seed[seed], pool.submit(write, by_seed[seed], image)))
            bar.update(1)
            if n % sampler.batch_size == 0:  # wait for the batch before: this one's files write meanwhile
                settle(previous)
                previous, current = current, []
                timing.setdefault("first_batch_s", time.perf_counter() - start - timing["load_s"])  # with capture
        drawn = time.perf_counter()  # the last batch is off the GPU; its PNGs may still be writing
        settle(previous + current)
    timing.update(seconds=time.perf_counter() - start, images=len(indices), batch_size=sampler.batch_size,
                  write_tail_s=time.perf_counter() - drawn, kernel_build_s=round(sampler.kernel_build_s, 3))
    later = len(indices) - sampler.batch_size
    if later > 0 and "first_batch_s" in timing:  # the steady rate, without loading, the first batch's capture and
        # the last batch's writes (paid once, not per image: a short run's rate would otherwise overstate a long one's)
        timing["s_per_image_after_first_batch"] = (drawn - start - timing["load_s"] - timing["first_batch_s"]) / later
    # the loaded base stays for training where it is the same load (base_handoff.py); the rest goes back now
    timing["left_base"] = float(leave_base and sampler.leave_base())
    manifest["timing"] = {k: round(v, 3) for k, v in timing.items()}
    del sampler  # its graph pools (and weights, unless left) go back before training loads
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
