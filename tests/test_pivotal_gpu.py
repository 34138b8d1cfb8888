"""GPU: the shipped recipe with pivotal tuning (model.pivotal) for 20 steps under 16-mixed on the full-size random
SDXL base, timed beside the recipe itself in the same call; prints both s/step (``pytest -m gpu -s``).

Pivotal tuning needs the prompt embeddings' gradient, so its run uses ``perf.cache: latents`` and no CUDA graph
(docs/training.md, "Pivotal tuning"); the recipe keeps its own switches.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
PIVOTAL = ["--model.pivotal.identifier=rraj", "--model.perf.cache=latents", "--model.perf.cuda_graph=false"]
STEPS, WARMUP = 15, 5  # 20 steps, the last 15 timed


def test_recipe_with_pivotal_tuning_runs_20_steps_under_16_mixed(tmp_path):
    from safetensors.torch import load_file

    from dreambooth_pl.tools.benchmark import build_base, train_benchmark

    base = build_base(str(REPO / "data" / "_cache" / "sdxl-random"), "sdxl")
    rows = {}
    for name, overrides in (("recipe", []), ("recipe + pivotal", PIVOTAL)):
        torch.cuda.reset_peak_memory_stats()
        rows[name] = train_benchmark("recipe", STEPS, WARMUP, base, tmp_path / name.replace(" + ", "_"), 1,
                                     overrides)
    for name, row in rows.items():
        print(f"{name}: {row['s_per_step']:.4f} s/step, peak reserved {row['run_peak_reserved_gib']:.2f} GiB, "
              f"loss {row['loss']:.4f}, trainable {row['trainable_params_m']:.4f} M")
    print("PIVOTAL_GPU " + json.dumps({k: {f: r[f] for f in ("s_per_step", "run_peak_reserved_gib", "loss",
                                                             "trainable_params_m")} for k, r in rows.items()}))
    pivotal = rows["recipe + pivotal"]
    assert pivotal["steps"] == STEPS and torch.isfinite(torch.tensor(pivotal["loss"]))
    # the new rows are trainable: 2 tokens x (768 + 1280) beside the recipe's adapters
    assert round((pivotal["trainable_params_m"] - rows["recipe"]["trainable_params_m"]) * 1e6) == 2 * (768 + 1280)
    (emb,) = (tmp_path / "recipe_pivotal" / "export").glob("*_emb.safetensors")
    saved = load_file(emb)
    assert saved["clip_l"].shape == (2, 768) and saved["clip_g"].shape == (2, 1280)
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_pivotal_recipe_with_sample_grid_and_subject_metrics(tmp_path):
    """configs/pivotal.yaml stacked on the recipe, with both training callbacks: finite scores, the new rows trained
    in fp32 beside the half encoders, and the grid drawn from the new tokens."""
    from test_gpu_acceptance import CALLBACKS, finite_losses, recipe_args

    from dreambooth_pl.callbacks.subject_metrics import SubjectMetrics
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.pivotal import token_table
    from dreambooth_pl.tools.benchmark import build_base, prepare_inputs

    base = build_base(str(REPO / "data" / "_cache" / "sdxl-random"), "sdxl")
    sdxl = (base, *prepare_inputs(tmp_path / "inputs"), tmp_path)
    cli = DreamBoothCLI(args=recipe_args(sdxl, tmp_path / "run", 10, "--config", str(REPO / "configs" / "pivotal.yaml"),
                                         *CALLBACKS))
    model = cli.model
    # an encoder's .dtype is its first parameter's, which is now the fp32 rows: ask a frozen layer instead
    half = [e.get_input_embeddings().table.weight.dtype for e in (model.text_encoder, model.text_encoder_2)]
    assert cli.trainer.global_step == 10 and half == [torch.float16, torch.float16]
    finite_losses(cli.trainer)
    scores = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SubjectMetrics)).last_scores
    assert scores and all(torch.isfinite(torch.tensor(v)) for v in scores.values())
    rows = [token_table(e).rows for e in (model.text_encoder, model.text_encoder_2)]
    assert all(r.dtype == torch.float32 and torch.isfinite(r).all() for r in rows)
    assert list((tmp_path / "run").glob("lightning_logs/*/version_*_emb.safetensors"))
