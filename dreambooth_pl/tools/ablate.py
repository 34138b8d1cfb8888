"""Ablation grids: fit every cell of a grid of config overrides, evaluate each LoRA, tabulate and plot the results.

A grid file (``configs/ablations/*.yaml``) is parsed into :class:`.ablation_grid.AblationGrid`. Each cell is one fit, in its own
named version dir ``OUT/runs/NAME`` (config.yaml, checkpoints/, the exported LoRA, ``ablate_status.json``),
evaluated with :func:`dreambooth_pl.tools.evaluate.evaluate_suite` once per sampler into ``OUT/runs/NAME/eval/``.
Everything is resumable: a run whose status says ``done`` and whose LoRA exists is skipped, an interrupted one
resumes from its ``last.ckpt``, an evaluation whose metrics JSON exists is read back. A failed cell is recorded
(status and error in its row) and the grid goes on.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from queue import Queue
from typing import Any, Literal, Optional

from ..runs import RunDir, fit_command
from .ablation_grid import AblationGrid, Evaluation, Sampler, check_evaluation, expand, load_grid
from ..io import check_output_dir, write_json
from .ablation_report import write_report

STATUS_FILE = "ablate_status.json"
METRICS_FILE = "ablate_metrics.json"


def fit_args(spec: AblationGrid, name: str, overrides: dict[str, Any], resume: bool) -> list[str]:
    """Command line of one cell's fit; logger, checkpoint and export paths are pinned to ``OUT/runs/NAME``."""
    return fit_command(spec.base_config, {**spec.overrides, **overrides}, RunDir(Path(spec.out) / "runs" / name),
                       resume)


def run_state(run_dir: Path) -> dict:
    """The run's status record (``{}`` if it never ran)."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_done(run_dir: Path) -> bool:
    return run_state(run_dir).get("status") == "done" and RunDir(run_dir).lora.is_file()


def _fit_inprocess(args: list[str], log: Path) -> Optional[str]:
    """Fit in this process; returns None or the error text."""
    from ..cli import DreamBoothCLI

    cli, argv = None, sys.argv
    try:
        sys.argv = argv[:1]  # LightningCLI warns when it is given args while sys.argv holds the ablate verb's
        cli = DreamBoothCLI(args=args, parser_kwargs={"exit_on_error": False, "fit": {"exit_on_error": False}})
        return None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a failed cell (bad override, OOM, ...) must not stop the grid
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e).strip() else ''}"
    finally:
        sys.argv = argv
        del cli
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next cell must not inherit this one's cached blocks
        except ImportError:
            pass


def _fit_subprocess(args: list[str], log: Path, gpu: Optional[int]) -> Optional[str]:
    """Fit in a child ``python -m dreambooth_pl`` (pinned to one GPU when ``gpu`` is set); log to ``log``."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "dreambooth_pl", *args], stdout=f, stderr=subprocess.STDOUT,
                               env=env)
    if code == 0:
        return None
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
    return f"exit code {code}: {tail[0][:500]} (full log: {log})"


def export_finished(run_dir: Path) -> Optional[str]:
    """Export the LoRA of a run whose ``last.ckpt`` already reached ``trainer.max_steps`` (a resumed fit that had
    nothing left to train ends without the export callback firing); returns None or the error text."""
    from ..io import load_checkpoint
    from .export import export

    run = RunDir(run_dir)
    last = run.last_ckpt
    max_steps = run.config().get("trainer", {}).get("max_steps")
    step = load_checkpoint(last, mmap=True).get("global_step", -1) if last.is_file() else -1
    if max_steps is None or step < max_steps:
        return f"fit ended without writing {run.lora} (interrupted?)"
    export(str(last), str(run.lora))  # written atomically: the run is done once this exists
    return None


def run_cell(spec: AblationGrid, name: str, overrides: dict[str, Any], launcher: str,
             gpu: Optional[int] = None) -> dict:
    """Fit one cell unless it is done; write and return its status record."""
    run_dir = Path(spec.out) / "runs" / name
    if is_done(run_dir):
        return run_state(run_dir)
    resume = RunDir(run_dir).last_ckpt.is_file()
    args = fit_args(spec, name, overrides, resume)
    log = Path(spec.out) / "logs" / f"{name}.log"
    start = time.time()
    print(f"[ablate] fit {name}" + (" (resuming from last.ckpt)" if resume else ""), flush=True)
    error = _fit_inprocess(args, log) if launcher == "inprocess" else _fit_subprocess(args, log, gpu)
    if error is None and not RunDir(run_dir).lora.is_file():
        error = export_finished(run_dir)
    state = {"name": name, "status": "failed" if error else "done", "error": error, "overrides": overrides,
             "seconds": round(time.time() - start, 1), "lora": str(RunDir(run_dir).lora) if not error else None}
    write_json(run_dir / STATUS_FILE, state)
    print(f"[ablate] {name}: {state['status']}" + (f" - {error}" if error else ""), flush=True)
    return state


def run_all(spec: AblationGrid, cells: list[tuple[str, dict]], launcher: str, gpus: Optional[list[int]]) -> None:
    """Fit every cell; with ``gpus`` (subprocess launcher) one queue worker per GPU."""
    if launcher == "subprocess" and gpus:
        free: Queue = Queue()
        for g in gpus:
            free.put(g)

        def job(cell):
            gpu = free.get()
            try:
                return run_cell(spec, *cell, launcher, gpu)
            finally:
                free.put(gpu)

        with ThreadPoolExecutor(len(gpus)) as pool:
            list(pool.map(job, cells))
        return
    for cell in cells:
        run_cell(spec, *cell, launcher)


def evaluate_lora(lora: Path, base: str, instance_dir: str, ev: Evaluation, sampler: Sampler, out: Path) -> dict:
    """Metrics of one LoRA under one sampler, cached in ``out/ablate_metrics.json``."""
    cache = out / METRICS_FILE
    if cache.is_file():
        return json.loads(cache.read_text())
    from .evaluate import evaluate_suite

    metrics = evaluate_suite(lora=str(lora), base=base, instance_dir=instance_dir, token=ev.token,
                             class_name=ev.class_name, out=str(out), suite=ev.suite, num_prompts=ev.num_prompts,
                             images_per_prompt=ev.images_per_prompt, scheduler=sampler.scheduler,
                             steps=sampler.steps, guidance=ev.guidance, resolution=ev.resolution,
                             clip_weights=ev.clip_weights, dino_weights=ev.dino_weights, seed=ev.seed,
                             pres_images=ev.pres_images, class_prompt=ev.class_prompt, drift=ev.drift)
    metrics = {k: v if isinstance(v, int) else float(v) for k, v in metrics.items()  # counts stay integers
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    write_json(cache, metrics)
    return metrics


def evaluate_run(run_dir: Path, lora: Path, ev: Evaluation, eval_root: Optional[Path] = None) -> list[dict]:
    """One row per sampler: ``scheduler``, ``sample_steps``, ``eval_dir``, metrics (or ``eval_error``).

    Args:
        run_dir: the run's version dir; its ``config.yaml`` gives the base model and the instance photos.
        lora: LoRA file to evaluate.
        ev: evaluation settings.
        eval_root: where each sampler's evaluation goes (None: ``run_dir/eval``).
    """
    cfg = RunDir(run_dir).config()
    base = cfg.get("model", {}).get("base_model")
    instance_dir = ev.instance_dir or cfg.get("data", {}).get("instance_dir")
    if not base or not instance_dir:
        raise SystemExit(f"ablate: {run_dir / 'config.yaml'} does not name model.base_model and data.instance_dir; "
                         "evaluate runs written by fit (their config.yaml), or set evaluation.instance_dir.")
    rows = []
    for sampler in ev.samplers:
        out = (eval_root or run_dir / "eval") / sampler.key
        row = {"scheduler": sampler.scheduler, "sample_steps": sampler.steps, "eval_dir": str(out)}
        try:
            row.update(evaluate_lora(lora, base, instance_dir, ev, sampler, out))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - one failed evaluation must not lose the others
            row["eval_error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            print(f"[ablate] evaluation of {run_dir.name} with {sampler.key} failed: {row['eval_error']}", flush=True)
        rows.append(row)
    return rows


def ablate(grid: str, out: Optional[str] = None, launcher: Literal["inprocess", "subprocess"] = "inprocess",
           gpus: Optional[list[int]] = None, evaluate: bool = True, only: Optional[list[str]] = None) -> str:
    """Fit and evaluate every cell of an ablation grid; write results.csv, results.md and plots (resumable).

    Args:
        grid: grid file, e.g. ``configs/ablations/prior.yaml``.
        out: output folder (None: the grid's ``out``).
        launcher: ``inprocess`` (LightningCLI in this process, one run after another) or ``subprocess``
            (one ``python -m dreambooth_pl fit`` per run).
        gpus: with ``subprocess``: GPU ids; runs are queued and one runs on each GPU at a time.
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
    run_all(spec, [c for c in cells if not only or c[0] in only], launcher, gpus)
    rows = []
    varied = list(dict.fromkeys(k for _, over in cells for k in over))
    for name, over in cells:
        run_dir = Path(spec.out) / "runs" / name
        state = run_state(run_dir)
        base = {"run": name, "status": state.get("status", "not run"), "error": state.get("error"), **over}
        if base["status"] == "done" and evaluate and spec.evaluation is not None:
            rows += [{**base, **r} for r in evaluate_run(run_dir, RunDir(run_dir).lora, spec.evaluation)]
        else:
            rows.append(base)
    paths = write_report(rows, Path(spec.out), varied, title=f"Ablation {Path(grid).stem}")
    failed = [r["run"] for r in rows if r["status"] != "done"]
    return f"{len(cells)} cell(s), {len(failed)} not done {failed}; report: {paths['md']}"
