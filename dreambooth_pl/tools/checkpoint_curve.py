"""Metric vs training steps from one run's saved checkpoints, without retraining.

Each checkpoint holds only the adapters (see ``DreamBoothLoRA.on_save_checkpoint``); they are exported as diffusers
LoRA files straight from the state dict (tools/export.py, no base loaded) and evaluated like the cells of an
ablation grid. The run must keep its checkpoints: ``checkpoint.save_top_k: -1`` with
``checkpoint.every_n_train_steps: N`` (the default keeps only ``last.ckpt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..io import check_output_dir, load_checkpoint
from ..runs import RunDir
from .ablate import evaluate_run
from .ablation_grid import Evaluation
from .ablation_report import write_report


def list_checkpoints(ckpt_dir: Path, every: Optional[int] = None) -> list[tuple[int, Path]]:
    """``[(global_step, path)]`` of the ``.ckpt`` files in ``ckpt_dir``, one per step, steps divisible by ``every``."""
    by_step: dict[int, Path] = {}
    for path in sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.name)):
        step = int(load_checkpoint(path, mmap=True).get("global_step", -1))
        if step > 0 and (not every or step % every == 0):
            by_step.setdefault(step, path)  # last.ckpt repeats a step already saved under its own name
    return sorted(by_step.items())


def export_checkpoints(ckpts: list[tuple[int, Path]], out: Path) -> list[tuple[int, Path]]:
    """Export each checkpoint's adapters to ``out/step_N/pytorch_lora_weights.safetensors`` (existing files are
    kept), straight from the checkpoint's state dict: no base model is loaded."""
    from ..adapter.files import LORA_FILE
    from .export import export

    for step, path in ckpts:
        target = out / f"step_{step}" / LORA_FILE
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                export(str(path), str(target))
            except ValueError as e:
                raise SystemExit(f"ablate-checkpoints: {path}: {e}") from None
    return [(s, out / f"step_{s}" / LORA_FILE) for s, _ in ckpts]


def ablate_checkpoints(run: str, evaluation: Evaluation, every: Optional[int] = None,
                       out: Optional[str] = None) -> str:
    """Evaluate a run's saved checkpoints every N steps: curve.csv, curve.md and plot_step.png (resumable).

    Args:
        run: the run's version dir (holding config.yaml and checkpoints/), e.g. ``ablations/prior/runs/NAME``.
        evaluation: evaluation settings (token, class_name, suite, samplers, ...; as in a grid file).
        every: keep checkpoints whose step is a multiple of this (None: all).
        out: output folder (None: ``RUN/curve``).
    """
    run_dir = Path(run)
    ckpt_dir = RunDir.at(run_dir).checkpoints
    if not ckpt_dir.is_dir():
        raise SystemExit(f"ablate-checkpoints: {ckpt_dir} does not exist; give the run's version dir "
                         "(lightning_logs/version_N or an ablation's runs/NAME).")
    ckpts = list_checkpoints(ckpt_dir, every)
    if not ckpts:
        raise SystemExit(f"ablate-checkpoints: no checkpoint in {ckpt_dir}" + (f" at a multiple of {every} steps" if
                         every else "") + ". Train with checkpoint.save_top_k: -1 and checkpoint.every_n_train_steps"
                         ": N to keep one every N steps.")
    if len(ckpts) == 1:
        print(f"[ablate-checkpoints] only one checkpoint (step {ckpts[0][0]}) in {ckpt_dir}: was the run trained with "
              "checkpoint.save_top_k: -1?", flush=True)
    dest = check_output_dir(out or run_dir / "curve", "ablate-checkpoints", ours=("loras", "eval*", "*.csv", "*.md", "*.png", "*.json"))
    rows = []
    for step, lora in export_checkpoints(ckpts, dest / "loras"):
        print(f"[ablate-checkpoints] step {step}", flush=True)
        rows += [{"run": run_dir.name, "status": "done", "step": step, **r, "lora": str(lora)}
                 for r in evaluate_run(run_dir, lora, evaluation, eval_root=dest / "eval" / f"step_{step}")]
    paths = write_report(rows, dest, ["step"], title=f"Checkpoint curve of {run_dir.name}", stem="curve")
    return f"{len(ckpts)} checkpoint(s) evaluated; report: {paths['md']}"
