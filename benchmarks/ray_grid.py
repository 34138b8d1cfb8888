"""A 4-cell recipe grid through Ray (``ablate``) against the same four fits run one after another by hand.

    python benchmarks/ray_grid.py BASE OUT [STEPS]

Writes ``OUT/ray-grid/grid.yaml`` (configs/sdxl_lora_prior.yaml on BASE, the sample dog, rank 4/8 x lr 1e-4/5e-5,
4 class images drawn once beforehand), times ``python -m dreambooth_pl ablate --evaluate false`` (one cell per GPU)
and the four ``python -m dreambooth_pl fit`` commands of the same cells run one after another on GPU 0, and prints
one JSON line: both wall times, Ray's overhead and the cells per hour of each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def main(base: str, out: str, steps: int = 60) -> dict:
    root = Path(out) / "ray-grid"
    root.mkdir(parents=True, exist_ok=True)
    grid = {"base_config": ["configs/sdxl_lora_prior.yaml"], "out": str(root / "ray"),
            "overrides": {"model.base_model": base, "trainer.max_steps": steps, "data.photos.dir": "data/sample/dog",
                          "data.photos.prompt": "a photo of sks dog", "data.priors.prompt": "a photo of dog",
                          "data.priors.dir": str(root / "class"), "data.priors.num_images": 4,
                          "data.priors.generate": False, "trainer.enable_progress_bar": False},
            "grid": {"model.lora.rank": [4, 8], "model.optim.learning_rate": [1.0e-4, 5.0e-5]}}
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    run = [sys.executable, "-m", "dreambooth_pl"]
    # the class images once, outside both timings (two cells at once must not draw into one folder)
    subprocess.run([*run, "generate-class-images", "--base", base, "--prompt", "a photo of dog", "--out",
                    str(root / "class"), "--num", "4", "--resolution", "1024", "--sampler.steps", "4",
                     "--progress", "false"],
                   check=True)
    t = time.perf_counter()
    subprocess.run([*run, "ablate", "--grid", str(path), "--evaluate", "false"], check=True)
    ray_wall = time.perf_counter() - t

    from dreambooth_pl.runs import RunDir, fit_command
    from dreambooth_pl.tools.ablation_grid import expand, load_grid

    spec = load_grid(str(path))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    t = time.perf_counter()
    for name, cell in expand(spec):
        args = fit_command(spec.base_config, {**spec.overrides, **cell}, RunDir(root / "by_hand" / "runs" / name))
        with open(root / f"by_hand-{name}.log", "w") as log:
            subprocess.run([*run, *args], check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    hand_wall = time.perf_counter() - t
    import torch

    gpus = torch.cuda.device_count()
    row = {"bench": "ray-grid", "cells": 4, "steps": steps, "gpus": gpus, "ray_wall_s": round(ray_wall, 1),
           "by_hand_wall_s": round(hand_wall, 1), "ray_overhead": round(ray_wall / hand_wall - 1, 4),
           "cells_per_hour_ray": round(4 * 3600 / ray_wall, 1), "cells_per_hour_one_gpu": round(4 * 3600 / hand_wall, 1),
           "speedup": round(hand_wall / ray_wall, 3)}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 60)
