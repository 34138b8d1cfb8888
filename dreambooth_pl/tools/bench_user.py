"""What a user waits for, timed from outside: class priors against diffusers' pipeline (``benchmark --preset
priors``), and the whole ``fit`` command from process start to the LoRA file (``benchmark --preset end-to-end``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..io import read_json
from ..prefetch import ENV as PREFETCH_ENV

GIB = 2**30
PROMPT = "a photo of person"


def timed_process(cmd: list[str], what: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` to its end and return it with its wall seconds (process start included: what a user waits);
    a non-zero exit raises with the ends of its output.

    Args:
        cmd: the command.
        what: its name in the error.
    """
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc, wall


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _pipeline_images(base: str, seeds: list[int], steps: int, resolution: int, batch: int) -> tuple[list, float, float]:
    """diffusers' plain ``StableDiffusionXLPipeline`` (fp16 on a GPU; its VAE decodes in fp32, as it upcasts):
    (PIL images, load seconds, seconds per image after one warm-up batch)."""
    from diffusers import StableDiffusionXLPipeline

    from ..sampling import make_scheduler
    from ..sdxl import resolve_base

    cuda = torch.cuda.is_available()
    t = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_base(base), dtype=torch.float16 if cuda else torch.float32,
                                                     add_watermarker=False).to("cuda" if cuda else "cpu")
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t

    def run(chunk):
        return pipe(prompt=[PROMPT] * len(chunk), num_inference_steps=steps, guidance_scale=5.0, height=resolution,
                    width=resolution, generator=[torch.Generator().manual_seed(s) for s in chunk]).images

    run(seeds[:batch])  # warm-up
    t, images = _sync(), []
    for start in range(0, len(seeds), batch):
        images += run(seeds[start:start + batch])
    per_image = (_sync() - t) / len(seeds)
    del pipe
    return images, load, per_image


# the sampler's switches timed against its defaults on a GPU (prior_sampler.PriorSampler's arguments)
# (fused q/k/v and cuDNN attention first were timed on 2026-12-05: within 0.5% of the default, BENCHMARKS.md)
# (bf16 alone: 0.941 s/image against fp16's 1.03 on 2026-12-04/05, other machines: now beside it in one call)
# (decode8: the VAE decodes a whole batch of 8 per call, not 4: its GroupNorms run 32 blocks per image)
VARIANTS = {"diffusers_geglu": {"fused_geglu": False}, "compiled_blocks": {"compile_blocks": True},
            "bf16": {"dtype": "bfloat16"}, "decode8": {"decode_batch": 8}, "batch16": {"batch_size": 16},
            "computed_negative": {"constant_negative": False}, "eager_norms": {"fused_norms": False},
            "nchw": {"channels_last": False}, "diffusers_attention": {"plain_attention": False},
            "vae_nchw": {"vae_channels_last": False}, "fp8": {"fp8_gemms": True},
            "fp8_compiled": {"fp8_gemms": True, "compile_blocks": True},
            "fp8_unfused": {"fp8_gemms": True, "fp8_fused_blocks": False}}


def priors_benchmark(base: str, images: int, steps: int = 25, resolution: int = 1024,
                     batch_size: int | None = None, reference_batch: int = 4,
                     variants: Sequence[str] | None = None) -> dict:
    """s/image of :class:`~dreambooth_pl.prior_sampler.PriorSampler` and of diffusers' pipeline at the same
    settings and seeds in this process, and how far apart their images are (uint8 levels); on a GPU, also the
    sampler in the pipeline's dtypes (fp16, fp32 VAE) over its first batch (``fp16_image_*``), which separates what
    the bf16 VAE changes from what the batching and the graph change, and the sampler with each of
    :data:`VARIANTS`' switches (``variants_s_per_image``; ``variants_first_batch_s``: its first batch, capture and
    any compilation included; ``variants_psnr_db``: its images against the default's, same seeds).

    Args:
        base: the base folder.
        images: timed images of each (after one warm-up batch).
        steps: Euler steps.
        resolution: square side.
        batch_size: the sampler's batch (None: the class-image default for this GPU).
        reference_batch: the pipeline's batch.
        variants: keys of :data:`VARIANTS` to time (None: all).
    """
    from ..data.class_images import _batch_size
    from ..prior_sampler import PriorSampler

    unknown = set(variants or ()) - set(VARIANTS)
    if unknown:
        raise ValueError(f"priors benchmark: unknown variant(s) {sorted(unknown)}; known: {sorted(VARIANTS)}")
    chosen = {k: v for k, v in VARIANTS.items() if variants is None or k in variants}
    seeds = list(range(images))
    t = time.perf_counter()
    sampler = PriorSampler(base, "euler", batch_size=_batch_size(batch_size, None))
    load = time.perf_counter() - t
    first = sampler.batch_size

    def timed(s) -> tuple[float, list, float]:
        """(first batch's seconds: capture and warm-up, the images, s/image over every seed after it)."""
        t = _sync()  # a whole batch of its own size: a short one would run eagerly and capture nothing
        list(s.images(PROMPT, seeds[:s.batch_size], steps, 5.0, None, resolution, resolution))
        warm = _sync() - t
        t = _sync()
        drawn = [img for _, img in s.images(PROMPT, seeds, steps, 5.0, None, resolution, resolution)]
        return warm, drawn, (_sync() - t) / images

    warmup, ours, per_image = timed(sampler)
    runtime = sampler.runtime()
    del sampler
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_reserved() / GIB
        torch.cuda.empty_cache()
    timed_variants, variants_first, variants_psnr = {}, {}, {}  # on a GPU, one switch changed, same seeds: its A/B
    for name, switch in (chosen.items() if torch.cuda.is_available() else ()):
        other = PriorSampler(base, "euler", **{"batch_size": first, **switch})
        variants_first[name], drawn, timed_variants[name] = timed(other)
        variants_psnr[name] = image_difference(drawn, ours)["image_psnr_db"]
        del other, drawn
        torch.cuda.empty_cache()
    same = None
    if torch.cuda.is_available() and runtime["vae_dtype"] != "float32":  # the pipeline's dtypes (fp16, fp32 VAE)
        half = PriorSampler(base, "euler", dtype="float16", batch_size=first, vae_dtype="float32")
        same = [img for _, img in half.images(PROMPT, seeds[:first], steps, 5.0, None, resolution, resolution)]
        del half
        torch.cuda.empty_cache()
    ref, ref_load, ref_per_image = _pipeline_images(base, seeds, steps, resolution, reference_batch)
    diff = image_difference(ours, ref)
    fp16 = {f"fp16_{k}": v for k, v in image_difference(same, ref[:first]).items()} if same else {}
    return {"preset": "priors", "s_per_image": per_image, "reference_s_per_image": ref_per_image,
            "speedup": ref_per_image / per_image, "variants_s_per_image": timed_variants,
            "variants_first_batch_s": variants_first, "variants_psnr_db": variants_psnr,
            "fuse_qkv": runtime["fuse_qkv"], "attention": runtime["attention"],
            "images": images, "steps": steps, "resolution": resolution,
            "batch_size": runtime["batch_size"], "dtype": runtime["dtype"], "vae_dtype": runtime["vae_dtype"],
            "load_s": load, "first_batch_s": warmup, "reference_load_s": ref_load,
            "peak_reserved_gib": peak if torch.cuda.is_available() else float("nan"),
            **diff, **fp16, "rank": 0}


def image_difference(ours: list, ref: list) -> dict:
    """How far two lists of 8-bit images are apart: max, mean and 99th percentile of |a - b| in levels, PSNR."""
    import numpy as np

    diff = np.stack([np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in zip(ours, ref)])
    mse = (diff.astype(np.float64) ** 2).mean()
    return {"image_diff_max": int(diff.max()), "image_diff_mean": float(diff.mean()),
            "image_diff_p99": float(np.percentile(diff, 99)),
            "image_psnr_db": float(10 * np.log10(255**2 / mse)) if mse else float("inf")}


def end_to_end_benchmark(base: str, work: Path, priors: int, steps: int, config: Path,
                         overrides: list[str] | None = None, full_priors: int = 197, full_steps: int = 1000,
                         again_steps: int = 0) -> dict:
    """Time ``python -m dreambooth_pl fit --config <config>`` with ``data.priors.generate: true`` from process
    start to its LoRA file (``to_lora_s``, the file's modification time) and to its exit (``wall_s``), on a fresh
    class folder and prior cache; read its phases (phases.json) and extrapolate both to ``full_priors`` priors and
    ``full_steps`` steps at the measured rates (the images' check and cache in proportion to their count).

    Args:
        base: the base folder.
        work: scratch folder (a fresh run folder, class folder and prior cache under it each call).
        priors: priors the run draws.
        steps: steps the run trains.
        config: the fit config (the shipped recipe).
        overrides: extra fit arguments.
        full_priors, full_steps: the user's run the figures are extrapolated to (197 priors, 1000 steps).
        again_steps: with more than 0, a second fit of ``again_steps`` steps follows on the same class folder,
            prior cache and latent store (``data.latent_cache``: a fresh folder per call, as the class folder, so
            the first fit writes it as a user's first run writes the default one; a rerun, an ablation, another
            subject of the class): its start to first step is ``again_start_to_first_step_s``, priors included.
    """
    from .benchmark import SAMPLE_DOG

    run = work / f"e2e-{time.strftime('%H%M%S')}"

    def fit_cmd(save_dir: Path, n_steps: int) -> list[str]:
        return [sys.executable, "-m", "dreambooth_pl", "fit", "--config", str(config), "--model.base_model", base,
                "--data.photos.dir", str(SAMPLE_DOG), "--data.photos.prompt", "a photo of sks person",
                "--data.priors.dir", str(run / "class"), "--data.priors.prompt", PROMPT,
                "--data.priors.num_images", str(priors), "--data.priors.generate", "true",
                "--data.priors.generation", json.dumps({"cache_dir": str(run / "prior-cache")}),
                "--data.latent_cache", str(run / "latents"),  # fresh, as the class folder: a first run writes it
                "--trainer.max_steps", str(n_steps), "--trainer.logger.init_args.save_dir", str(save_dir),
                "--trainer.enable_progress_bar", "false", *(overrides or [])]

    started = time.time()  # wall clock: compared with the LoRA file's modification time
    proc, wall = timed_process(fit_cmd(run, steps), "end-to-end fit")
    folder = next(run.glob("lightning_logs/version_*"))
    lora = folder / "pytorch_lora_weights.safetensors"
    if not lora.is_file():
        raise RuntimeError(f"end-to-end fit wrote no LoRA under {folder}")
    # the LoRA is written when training ends; the process then moves the module to the CPU (Lightning's teardown),
    # prints its summary, closes TensorBoard and exits: both ends are reported
    to_lora = min(wall, max(0.0, lora.stat().st_mtime - started))
    p = read_json(folder / "phases.json", "fit's phase timings", ("s_per_step",))
    rate = p["s_per_step"]
    # priors: loading and the first batch (capture) once, the rest at the steady rate the manifest records
    timing = read_json(run / "class" / "manifest.json", "class-image manifest").get("timing", {})
    steady = timing.get("s_per_image_after_first_batch")
    if steady is None:  # one batch only: scale the whole phase
        full_prior_s = p["priors"] * full_priors / priors
    else:  # the phase's own overhead, loading, the first batch and the last batch's writes once, then every later
        # image at the steady rate
        once = (p["priors"] - timing["seconds"] + timing["load_s"] + timing["first_batch_s"]
                + timing.get("write_tail_s", 0))
        full_prior_s = once + steady * (full_priors - timing["batch_size"])
    # checking and caching the images: the whole phase scaled with the run's image count (call 2 of 2026-12-06
    # session 3: 197 priors cached in 25.0 s, where a 16-prior run's 4.9 s had been carried over unscaled). Its fixed
    # part (encoding the prompts, moving the encoders) is scaled too, so the figure errs long, never short.
    if "n_images" not in p:
        raise RuntimeError(f"{folder / 'phases.json'} has no image counts: the run predates them; rerun the benchmark")
    per_image = p["cache"] + p.get("start_data", 0.0)
    full_images_s = per_image * (p["n_images"] - p["n_priors"] + full_priors) / p["n_images"]
    full = (wall - p["priors"] - p["steps"] - per_image) + full_prior_s + rate * (full_steps - 1) + full_images_s
    full_to_lora = full - (wall - to_lora)
    plan = [line for line in (proc.stdout + proc.stderr).splitlines() if "memory plan:" in line]
    again = {}
    if again_steps:  # the same class folder and stores, a fresh run folder
        _, again_wall = timed_process(fit_cmd(run / "again", again_steps), "second end-to-end fit")
        q = read_json(next((run / "again").glob("lightning_logs/version_*")) / "phases.json", "second fit's phases")
        again = {"again_wall_s": again_wall, "again_phases": q,
                 "again_start_to_first_step_s": q["to_first_step_without_priors"] + q["priors"]}
    return {**again, "preset": "end-to-end", "config": str(config), "priors": priors, "steps": steps, "wall_s": wall,
            "phases": p, "s_per_prior": p["priors"] / priors, "prior_timing": timing,
            "extrapolated_priors_s": full_prior_s, "extrapolated_check_and_cache_s": full_images_s, "s_per_step": rate,
            "start_to_first_step_s": p["to_first_step_without_priors"], "memory_plan": plan[-1] if plan else None,
            "full_priors": full_priors, "full_steps": full_steps, "extrapolated_min": full / 60,
            "to_lora_s": to_lora, "extrapolated_to_lora_min": full_to_lora / 60,
            "overrides": " ".join(overrides or []), "rank": 0,
            # whether the fits read the CUDA libraries ahead (prefetch.py; gpu.sh cold-ab's arms turn it off)
            "prefetch": os.environ.get(PREFETCH_ENV, "1") != "0"}
