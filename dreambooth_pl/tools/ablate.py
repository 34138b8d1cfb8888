"""Ablation grids: fit every cell of a grid of config overrides, evaluate each LoRA, tabulate and plot the results.

A grid file (``configs/ablations/*.yaml``) is parsed into :class:`.ablation_grid.AblationGrid`. Each cell is one fit, in its own
named version dir ``OUT/runs/NAME`` (config.yaml, checkpoints/, the exported LoRA, ``ablate_status.json``),
evaluated with :func:`dreambooth_pl.tools.evaluate.evaluate_suite` once per sampler into ``OUT/runs/NAME/eval/``.
Each cell is one Ray task (tools/jobs.py: local Ray by default, ``--address`` joins a cluster) that fits in a child
process and then evaluates. Everything is resumable: a run whose status says ``done`` and whose LoRA exists is
skipped, a killed one resumes from its ``last.ckpt`` (Ray retries it), an evaluation whose metrics JSON exists is
read back. A failed cell is recorded (status, error and log path in its row) and the grid goes on.
``tensorboard --logdir OUT`` shows every cell's curves under ``runs/NAME``.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..moved_keys import nest_hparams
from ..runs import RunDir, fit_command
from ..sampler_settings import SamplerSettings
from .ablation_grid import AblationGrid, Evaluation, check_evaluation, expand, load_grid, sampler_key
from ..io import check_output_dir, read_json, write_json
from .ablation_report import write_report
from .jobs import FitJob, read_status, run_jobs

METRICS_FILE = "ablate_metrics.json"


def cell_jobs(spec: AblationGrid, cells: list[tuple[str, dict[str, Any]]], evaluate: bool) -> list[FitJob]:
    """One fit job per cell, its outputs pinned to ``OUT/runs/NAME``, its log ``OUT/logs/NAME.log``; the
    evaluation runs in the cell's task after its fit."""
    out, jobs = Path(spec.out), []
    for name, overrides in cells:
        run = RunDir(out / "runs" / name)
        then = (evaluate_run, (run.path, run.lora, spec.evaluation)) if evaluate and spec.evaluation else None
        jobs.append(FitJob(name, run, fit_command(spec.base_config, {**spec.overrides, **overrides}, run),
                           out / "logs" / f"{name}.log", then, {"overrides": overrides}))
    return jobs


def evaluate_lora(lora: Path, base: str, instance_dir: str, ev: Evaluation, sampler: SamplerSettings,
                  out: Path) -> dict:
    """Metrics of one LoRA under one sampler, cached in ``out/ablate_metrics.json``."""
    cache = out / METRICS_FILE
    if cache.is_file():
        return read_json(cache, "cached cell metrics")
    from ..console import quiet_third_party
    from .evaluate import evaluate_suite

    quiet_third_party()  # a Ray worker or the driver: neither has turned the model-loading bars off yet

    metrics = evaluate_suite(lora=str(lora), base=base, instance_dir=instance_dir, out=str(out), sampler=sampler,
                             **ev.suite_args())
    metrics = {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()  # counts stay integers
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_json(cache, metrics)
    return metrics


def evaluate_run(run_dir: Path, lora: Path, ev: Evaluation, eval_root: Optional[Path] = None) -> list[dict]:
    """One row per sampler: ``scheduler``, ``sample_steps``, ``guidance``, ``eval_dir``, metrics (or ``eval_error``).

    Args:
        run_dir: the run's version dir; its ``config.yaml`` gives the base model and the instance photos.
        lora: LoRA file to evaluate.
        ev: evaluation settings.
        eval_root: where each sampler's evaluation goes (None: ``run_dir/eval``).
    """
    cfg = RunDir(run_dir).config()
    base = cfg.get("model", {}).get("base_model")
    data = nest_hparams(cfg.get("data") or {}, "data")  # a run from before the data groups too
    instance_dir = ev.instance_dir or (data.get("photos") or {}).get("dir")
    if not base or not instance_dir:
        raise SystemExit(f"ablate: {run_dir / 'config.yaml'} does not name model.base_model and data.photos.dir; "
                         "evaluate runs written by fit (their config.yaml), or set evaluation.instance_dir.")
    rows = []
    for sampler in ev.samplers:
        out = (eval_root or run_dir / "eval") / sampler_key(sampler)
        row = {"scheduler": sampler.scheduler, "sample_steps": sampler.steps, "guidance": sampler.guidance,
               "eval_dir": str(out)}
        try:
            row.update(evaluate_lora(lora, base, instance_dir, ev, sampler, out))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - one failed evaluation must not lose the others
            row["eval_error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            print(f"[ablate] evaluation of {run_dir.name} with {sampler_key(sampler)} failed: {row['eval_error']}",
                  flush=True)
        rows.append(row)
    return rows


def ablate(grid: str, out: Optional[str] = None, address: Optional[str] = None, workers: Optional[int] = None,
           retries: int = 2, evaluate: bool = True, only: Optional[list[str]] = None) -> str:
    """Fit and evaluate every cell of an ablation grid on Ray; write results.csv, results.md and plots (resumable).

    Args:
        grid: grid file, e.g. ``configs/ablations/prior.yaml``.
        out: output folder (None: the grid's ``out``).
        address: Ray cluster (``auto``, ``ray://host:10001``); None: a local Ray started and stopped here.
        workers: cells at once on a machine without GPUs (None: 1); with GPUs one cell per GPU.
        retries: how often a cell whose fit process died is retried, resuming from its ``last.ckpt``.
        evaluate: also evaluate (needs the grid's ``evaluation`` section).
        only: names of cells to run (None: all); the report still covers every finished cell.
    """
    spec = load_grid(grid)
    if out:
        spec.out = out
    cells = expand(spec)
    if evaluate and spec.evaluation is not None:
        check_evaluation(spec.evaluation, grid)
    unknown = sorted(set(only or []) - {n for n, _ in cells})
    if unknown:
        raise SystemExit(f"ablate: --only names unknown cells {unknown}; cells: {[n for n, _ in cells]}")
    check_output_dir(spec.out, "ablate", ours=("grid.json", "runs", "eval*", "*.csv", "*.md", "*.png", "*.json"))
    write_json(Path(spec.out) / "grid.json", asdict(spec))
    run_jobs(cell_jobs(spec, [c for c in cells if not only or c[0] in only], evaluate), address, workers, retries,
             title=f"ablate {Path(grid).stem}")
    rows = []
    varied = list(dict.fromkeys(k for _, over in cells for k in over))
    for name, over in cells:
        run_dir = Path(spec.out) / "runs" / name
        state = read_status(RunDir(run_dir))
        base = {"run": name, "status": state.get("status", "not run"), "error": state.get("error"), **over}
        if base["status"] == "done" and evaluate and spec.evaluation is not None:
            rows += [{**base, **r} for r in evaluate_run(run_dir, RunDir(run_dir).lora, spec.evaluation)]
        else:
            rows.append(base)
    paths = write_report(rows, Path(spec.out), varied, title=f"Ablation {Path(grid).stem}")
    failed = [r["run"] for r in rows if r["status"] != "done"]
    return f"{len(cells)} cell(s), {len(failed)} not done {failed}; report: {paths['md']}"
