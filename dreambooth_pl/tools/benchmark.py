"""``python -m dreambooth_pl benchmark --preset P``: steady-state speed and memory of the real training path
(DreamBoothCLI -> DreamBoothLoRA + DreamBoothDataModule) on a random-weight full-size SDXL base, or of sampling.

Speed and memory do not depend on weight values, so a random base (built once per machine) stands in for the
real one. Results feed BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch

from .step_timer import StepTimer, step_stats

Preset = Literal["recipe", "fast", "t4-16gb", "t4-16gb-te", "8gb", "sample", "priors", "end-to-end"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "perf"
RECIPE = CONFIGS.parent / "sdxl_lora_prior.yaml"  # the shipped recipe, preset "recipe"
SAMPLE_DOG = Path(__file__).resolve().parents[2] / "data" / "sample" / "dog"
GIB = 2**30


def prepare_inputs(work: Path, n_class: int = 4, seed: int = 0) -> tuple[str, str]:
    """(instance dir with the sample dog photos, class dir with ``n_class`` random 1024² images)."""
    import numpy as np
    from PIL import Image

    from ..io import save_image

    cls = work / "class"
    cls.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_class):
        path = cls / f"{i:04d}.png"
        if not path.exists():
            save_image(path, Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)))
    return str(SAMPLE_DOG), str(cls)


def build_base(base: str, preset: Literal["tiny", "sdxl"]) -> str:
    """Build the random base once per machine (on the GPU when there is one: random init of 3.5B parameters on
    the CPU takes minutes), stored in float16."""
    from ..bases import make_base

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        return make_base(preset, base, dtype="float16" if preset == "sdxl" else "float32")


def environment() -> dict:
    """GPU name and library versions for the results table."""
    import diffusers
    import peft
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": L.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "transformers": transformers.__version__}


def train_benchmark(preset: str, steps: int, warmup: int, base: str, work: Path, devices: int,
                    overrides: list[str], profile: Optional[str] = None, count_flops: bool = False) -> dict:
    """Run ``fit`` with ``configs/perf/<preset>.yaml`` for ``warmup + steps`` steps and time the last ``steps``."""
    from ..cli import DreamBoothCLI
    from ..runs import fit_command

    import yaml

    start = time.perf_counter()
    instance_dir, class_dir = prepare_inputs(work)
    timer = StepTimer(warmup, flop_step=0 if count_flops else -1, profile=profile)
    config = RECIPE if preset == "recipe" else CONFIGS / f"{preset}.yaml"
    recipe_steps = yaml.safe_load(config.read_text())["trainer"]["max_steps"]
    # reruns share work/export, so the CLI parses without running (run=False: no refusal to overwrite an earlier
    # run's export) and trainer.fit is called here
    args = fit_command([config], {
        "model.base_model": base, "data.photos.dir": instance_dir, "data.priors.dir": class_dir,
        "data.priors.num_images": 4, "trainer.max_steps": warmup + steps, "trainer.devices": devices,
        "trainer.logger.init_args.save_dir": work / "runs", "trainer.enable_progress_bar": False,
        "trainer.default_root_dir": work / "runs", "checkpoint.every_n_train_steps": 0,
        "checkpoint.save_last": False, "export.dirpath": work / "export",
        # every row encodes its inputs, as a first run does (auto would read an earlier row's latents on a GPU)
        "data.latent_cache": None}, verb=False) + list(overrides)
    cli = DreamBoothCLI(args=args, run=False, trainer_defaults={"callbacks": [timer]})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - start  # load, caching, capture/compile, every step, export: what a user waits for
    trainer, model = cli.trainer, cli.model
    n_images = trainer.datamodule.shape().images
    opt = trainer.optimizers[0]
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
    cuda = trainer.strategy.root_device.type == "cuda"
    return {
        "preset": preset, "overrides": " ".join(overrides), "devices": trainer.world_size, "steps": timer.steps,
        "s_per_step": timer.seconds, "images_per_s": n_images * trainer.world_size / timer.seconds,
        # null unless counted (--count_flops): a 0 here once read as a measurement
        "tflop_per_step": timer.flops / 1e12 or None, "tflops": timer.flops / 1e12 / timer.seconds or None,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else float("nan"),
        "setup_peak_reserved_gib": timer.peak_setup / GIB,
        "warmup_peak_reserved_gib": timer.peak_overall[1] / GIB,
        "run_peak_reserved_gib": max(timer.peak_overall[1], torch.cuda.max_memory_reserved() if cuda else 0) / GIB,
        # what the run needed (prior draw, caching, steps): under memory_cap_gib the reserved peak climbs toward the
        # cap, because the caching allocator frees its cache only on reaching it
        "run_peak_alloc_gib": max(timer.peak_overall[0], torch.cuda.max_memory_allocated() if cuda else 0) / GIB,
        "wall_s": wall, "recipe_steps": recipe_steps,
        # the measured run, plus the recipe's remaining steps at the steady rate
        "time_to_lora_min": (wall + (recipe_steps - trainer.global_step) * timer.seconds) / 60,
        "warmup_s": [round(s, 3) for s in timer.warmup_s], **step_stats(timer.step_s),
        "optimizer_state_mib": opt_bytes / 2**20,
        "trainable_params_m": sum(p.numel() for p in model.trainable_parameters().values()) / 1e6,
        "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))), "rank": trainer.global_rank,
    }


# runs diffusers' script unchanged in this process, marking the end of every backward with a CUDA event (host time
# on a CPU; no sync inside its loop), and printing the seconds between marks and the memory peaks at exit
_REFERENCE_PROBE = """
import atexit, runpy, sys, time, torch
marks, backward, cuda = [], torch.Tensor.backward, torch.cuda.is_available()
def timed_backward(self, *args, **kwargs):
    out = backward(self, *args, **kwargs)
    if cuda:
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
    else:
        marks.append(time.perf_counter())
    return out
def report():
    if cuda:
        torch.cuda.synchronize()
    gaps = [(a.elapsed_time(b) / 1e3) if cuda else b - a for a, b in zip(marks, marks[1:])]
    print('REFERENCE_PEAK', torch.cuda.max_memory_allocated() if cuda else 0,
          torch.cuda.max_memory_reserved() if cuda else 0, flush=True)
    print('REFERENCE_STEPS', len(marks), *gaps, flush=True)
torch.Tensor.backward = timed_backward
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def reference_benchmark(script: str, base: str, work: Path, steps: int, warmup: int, mixed_precision: str = "fp16",
                        recipe: bool = True, recipe_steps: int = 1000) -> dict:
    """Time diffusers' ``train_dreambooth_lora_sdxl.py`` (unchanged) on the same base and data in this call.

    Args:
        script: path of the reference script.
        base, work: as for :func:`train_benchmark` (same sample photos and class images).
        steps, warmup: it runs ``warmup + steps`` steps; s/step is the mean time between the ends of the last
            ``steps + 1`` backward passes (its load, class-image and warm-up time excluded, as for our runs; at
            least one warm-up step, whose end starts the first timed one).
        mixed_precision: ``fp16`` (with ``recipe``: the original project's recipe: checkpointing, 8-bit Adam) or
            ``bf16`` (its fastest: no checkpointing, AdamW).
        recipe: add ``--gradient_checkpointing --use_8bit_adam``.
        recipe_steps: steps of the full run its time-to-LoRA is extrapolated to.
    """
    import sys

    if warmup < 1 or steps < 1:
        raise ValueError(f"--reference needs --warmup >= 1 and --steps >= 1 (got {warmup}, {steps}): the first "
                         "step's start is not marked inside the script")
    instance_dir, class_dir = prepare_inputs(work)
    n = warmup + steps
    out = work / f"reference-{mixed_precision}"
    cmd = [sys.executable, "-c", _REFERENCE_PROBE, script, "--pretrained_model_name_or_path", base,
           "--instance_data_dir", instance_dir, "--instance_prompt", "a photo of sks dog",
           "--output_dir", str(out), "--resolution", "1024", "--train_batch_size", "1", "--learning_rate",
           "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
           "--with_prior_preservation", "--class_data_dir", class_dir, "--num_class_images", "4",
           "--class_prompt", "a photo of dog", "--mixed_precision", mixed_precision, "--rank", "4",
           "--max_train_steps", str(n), "--checkpointing_steps", "100000", "--report_to", "tensorboard"]
    cmd += ["--gradient_checkpointing", "--use_8bit_adam"] if recipe else []
    from .bench_user import timed_process

    proc, wall = timed_process(cmd, "reference script")
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
             if line.startswith(("REFERENCE_PEAK", "REFERENCE_STEPS"))}
    alloc, reserved = (int(v) / GIB for v in lines["REFERENCE_PEAK"])
    count, *gaps = lines["REFERENCE_STEPS"]
    if int(count) != n:
        raise RuntimeError(f"reference script ran {count} backward passes, expected {n} ({script})")
    step_s = [float(v) for v in gaps][warmup - 1:]  # gap i ends at step i + 2; the first timed ends at warmup + 1
    per_step = sum(step_s) / len(step_s)
    return {"preset": f"reference-{mixed_precision}" + ("-recipe" if recipe else ""), "s_per_step": per_step,
            "images_per_s": 2 / per_step, **step_stats(step_s), "peak_alloc_gib": alloc,
            "peak_reserved_gib": reserved, "run_peak_reserved_gib": reserved, "wall_s": wall,
            "recipe_steps": recipe_steps, "time_to_lora_min": (wall + (recipe_steps - n) * per_step) / 60,
            "steps": len(step_s), "rank": 0, "script": script}


def sample_benchmark(base: str, images: int, steps: int = 25, resolution: int = 1024) -> dict:
    """Seconds per 1024² image at ``steps`` Euler steps in float16 through sampling.load_pipeline/generate."""
    from ..sampling import generate, load_pipeline

    pipe = load_pipeline(base, scheduler="euler", dtype="float16")
    cuda = torch.cuda.is_available()
    generate(pipe, ["a photo of sks dog"], [0], steps=steps, height=resolution, width=resolution)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    generate(pipe, ["a photo of sks dog"] * images, list(range(images)), steps=steps, height=resolution,
             width=resolution, batch_size=1)
    if cuda:
        torch.cuda.synchronize()
    s = (time.perf_counter() - t) / images
    return {"preset": "sample", "s_per_image": s, "steps": steps, "resolution": resolution,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else float("nan"), "rank": 0}


def benchmark(preset: Preset = "fast", steps: int = 20, warmup: int = 5, base: str = "data/_cache/sdxl-random",
              base_preset: Literal["tiny", "sdxl"] = "sdxl", work: str = "data/_cache/bench", devices: int = 1,
              overrides: Optional[list[str]] = None, out: Optional[str] = None,
              profile: Optional[str] = None, reference: Optional[str] = None,
              reference_precision: Literal["fp16", "bf16"] = "fp16", count_flops: bool = False,
              priors: int = 197, memory_cap_gib: Optional[float] = None, again_steps: int = 0,
              variants: Optional[list[str]] = None) -> Optional[str]:
    """Measure s/step, images/s, peak memory and TFLOP/s of the real training path (or sampling s/image).

    Args:
        preset: ``recipe`` (configs/sdxl_lora_prior.yaml), ``fast``, ``t4-16gb``, ``t4-16gb-te``, ``8gb``
            (configs/perf/<preset>.yaml), ``sample``, ``priors`` (class priors against diffusers' pipeline, same
            seeds, with the image difference) or ``end-to-end`` (the recipe's ``fit`` with
            ``data.priors.generate: true`` timed from process start to the LoRA file, phases included;
            tools/bench_user.py).
        steps: timed steady-state steps (images for ``sample`` and ``priors``; the run's steps for ``end-to-end``).
        warmup: untimed first steps (compilation happens here; their times are reported).
        base: random full-size base folder (built on first use, float16).
        base_preset: ``sdxl`` (full size) or ``tiny`` (CPU tests of this command).
        work: scratch folder for class images and run files.
        devices: GPUs (DDP when > 1).
        overrides: extra ``fit`` arguments, e.g. ``--model.optim.name=adamw``.
        out: append the result as one JSON line to this file.
        profile: write a torch.profiler table, trace and GPU idle gaps of the timed steps to this file.
        reference: instead, time diffusers' ``train_dreambooth_lora_sdxl.py`` at this path on the same base and
            data (``../shared/reference/``; run unchanged), for ``warmup + steps`` steps, timing the last ``steps``.
        reference_precision: the reference's ``fp16`` recipe (checkpointing, 8-bit Adam) or ``bf16`` (its fastest).
        priors: class priors the ``end-to-end`` run draws (its figures are also extrapolated to 197 and 1000 steps).
        count_flops: count the first step's FLOPs (torch's FlopCounterMode). Off by default: under the counter
            the first step runs compiled parts eagerly and its memory peak grows by several GiB (measured: 20.3
            against 7.1 GiB whole-run peak for the recipe), so memory and warm-up are measured without it.
        memory_cap_gib: cap this process's CUDA allocations at this many GiB
            (``torch.cuda.set_per_process_memory_fraction``): an 8 GB card on a bigger one; past it the run fails.
        again_steps: ``end-to-end`` only: time a second fit of this many steps on the same class folder and
            stores (0: off; bench_user.end_to_end_benchmark).
        variants: ``priors`` only: the sampler switches to time beside the default (keys of
            ``bench_user.VARIANTS``; None: all).
    """
    from ..io import check_output_dir, check_output_file

    check_output_dir(work, "benchmark", "--work", ours=("*",))  # a scratch folder: only never / or ~
    if out:
        check_output_file(out)
    base = build_base(base, base_preset)
    if memory_cap_gib is not None and torch.cuda.is_available():  # after the base is built: the run alone is capped
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_cap_gib * GIB / total)
        torch.cuda.reset_peak_memory_stats()
    if reference:
        fp16 = reference_precision == "fp16"
        result = reference_benchmark(reference, base, Path(work), steps, warmup, reference_precision, recipe=fp16)
    elif preset == "sample":
        result = sample_benchmark(base, steps, resolution=1024 if base_preset == "sdxl" else 64)
    elif preset == "priors":
        from .bench_user import priors_benchmark

        result = priors_benchmark(base, steps, resolution=1024 if base_preset == "sdxl" else 64, variants=variants)
    elif preset == "end-to-end":
        from .bench_user import end_to_end_benchmark

        result = end_to_end_benchmark(base, Path(work), priors, steps, RECIPE, list(overrides or []),
                                      again_steps=again_steps)
    else:
        result = train_benchmark(preset, steps, warmup, base, Path(work), devices, list(overrides or []),
                                 profile, count_flops)
    if result["rank"] != 0:
        return None
    result.update(environment(), date=time.strftime("%Y-%m-%d"), memory_cap_gib=memory_cap_gib)
    line = json.dumps(result)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    return line
