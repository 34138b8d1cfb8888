"""Independent fits on Ray: each job is one Ray task that runs ``python -m dreambooth_pl fit`` in a child process.

Used by ``ablate`` (one job per grid cell) and ``fit-many`` (one per subject, after one class-prior task per
class). Ray is imported here only, so ``fit`` never pays for it. Without an address a local Ray is started and
stopped by the command (a sequential run is one worker); ``--address auto`` or ``ray://host:10001`` joins a cluster.

Faults (docs/scale.md):
- a fit process that dies from a signal (SIGKILL, the OOM killer, a SIGTERM stop) or a lost worker is retried by
  Ray, and the retry continues from the run's own ``last.ckpt`` through fit's exact resume;
- a job whose status says ``done`` and whose LoRA exists is read back, not run;
- a fit that fails for good (bad config, bad photo: exit status 1) is reported with its error and log path.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..io import read_json, write_json
from ..runs import RunDir

STATUS_FILE = "ablate_status.json"


class FitProcessDied(RuntimeError):
    """The fit child was killed by a signal (or stopped on SIGTERM): Ray retries the job, which resumes."""


@dataclass
class FitJob:
    """One fit in its own run folder.

    Args:
        name: the job's name (grid cell or subject), unique in the batch.
        run: the run folder every output is pinned into (``runs.fit_command(..., run)``).
        args: ``fit`` arguments without ``--ckpt_path`` (added on resume).
        log: the fit's stdout and stderr, appended per attempt.
        then: ``(function, args)`` run in the worker after a successful fit (e.g. the cell's evaluation).
        info: extra fields of the status record (the cell's overrides, the subject).
    """

    name: str
    run: RunDir
    args: list[str]
    log: Path
    then: Optional[tuple[Callable, tuple]] = None
    info: dict = field(default_factory=dict)

    @property
    def status_file(self) -> Path:
        return self.run.path / STATUS_FILE


def read_status(run: RunDir) -> dict:
    """A job's status record (``{}`` if it never ran, or its file was cut short by a kill: the job runs again)."""
    try:
        return read_json(run.path / STATUS_FILE, "job status")
    except ValueError:
        return {}


def is_done(run: RunDir) -> bool:
    return read_status(run).get("status") == "done" and run.lora.is_file()


def checkpoint_step(path: Path) -> int:
    """``global_step`` of a checkpoint (-1 if absent)."""
    from ..io import load_checkpoint

    return load_checkpoint(path, mmap=True).get("global_step", -1) if path.is_file() else -1


def export_finished(run: RunDir) -> Optional[str]:
    """Export the LoRA of a run whose ``last.ckpt`` already reached ``trainer.max_steps`` (a resumed fit that had
    nothing left to train ends without the export callback firing); returns None or the error text."""
    from .export import export

    max_steps = run.config().get("trainer", {}).get("max_steps")
    if max_steps is None or checkpoint_step(run.last_ckpt) < max_steps:
        return f"fit ended without writing {run.lora} (interrupted?)"
    export(str(run.last_ckpt), str(run.lora))  # written atomically: the run is done once this exists
    return None


def last_error(log: Path) -> str:
    """The failure's message in a fit log: its last ``error: ...`` or ``...Error: ...`` line, else the last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    found = [ln for ln in lines if re.match(r"(error: |[\w.]*(Error|Exception|Exit)\b)", ln)]
    return (found or lines or [""])[-1][:500]


def _die_with_parent() -> None:
    """In the fit child: SIGTERM when the Ray worker that started it dies (Linux), so a stopped grid leaves no
    orphan fit; SIGTERM makes fit save a resumable checkpoint and exit (callbacks/fault_tolerance.py)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_fit_job(job: FitJob, session: str, *upstream: Any) -> dict:
    """Ray task body: fit ``job`` (resuming from its ``last.ckpt`` when one exists), then ``job.then``.

    Args:
        job: the fit.
        session: this command's id; the attempt count restarts in a new session.
        upstream: results of the tasks this one waits for (class priors); Ray resolves them first.
    """
    before = read_status(job.run)
    attempt = before.get("attempt", 0) + 1 if before.get("session") == session else 1
    start = time.time()
    write_json(job.status_file, {"name": job.name, "status": "running", "attempt": attempt, "session": session,
                                 "started": start, "log": str(job.log), **job.info})
    resume = job.run.last_ckpt.is_file()
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        step = checkpoint_step(job.run.last_ckpt) if resume else 0
        log.write(f"[jobs] {job.name} attempt {attempt}: " + (f"resuming from {job.run.last_ckpt} at step {step}\n"
                                                             if resume else "starting at step 0\n"))
        log.flush()
        args = [sys.executable, "-m", "dreambooth_pl", *job.args, *(["--ckpt_path=last"] if resume else [])]
        code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    if code < 0 or code >= 128:  # a signal: killed (SIGKILL, OOM) or stopped (SIGTERM after a checkpoint)
        signum = -code if code < 0 else code - 128
        name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
        write_json(job.status_file, {**read_status(job.run), "status": "retrying", "error": f"fit killed by {name}"})
        raise FitProcessDied(f"{job.name}: fit process killed by {name} (log: {job.log})")
    error = None
    if code != 0:
        error = f"exit code {code}: {last_error(job.log)} (log: {job.log})"
    elif not job.run.lora.is_file():
        error = export_finished(job.run)
    state = {"name": job.name, "status": "failed" if error else "done", "error": error, "attempt": attempt,
             "session": session, "seconds": round(time.time() - start, 1), "log": str(job.log),
             "worker": f"{socket.gethostname()}:{os.getpid()}",  # which machine and Ray worker ran it
             "lora": None if error else str(job.run.lora), **job.info}
    if error is None and job.then is not None:
        fn, fn_args = job.then
        try:
            fn(*fn_args)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the fit is done; the driver reruns and reports the rest
            print(f"[jobs] {job.name}: after-fit step failed in the worker: {type(e).__name__}: {e}", flush=True)
    write_json(job.status_file, state)
    return state


@dataclass
class Task:
    """A non-fit step other jobs wait for (a class-prior draw): ``fn(*args)`` in a worker.

    Args:
        name: shown in the live table.
        fn: a module-level function (Ray pickles it by reference).
        args: its arguments.
    """

    name: str
    fn: Callable
    args: tuple


def _call(task: Task) -> Any:
    return task.fn(*task.args)


def job_resources(workers: Optional[int]) -> dict:
    """Ray options of one job: one GPU where the cluster has GPUs, else an equal share of its CPUs."""
    import ray

    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": max(1, int(res.get("CPU", 1)) // max(1, workers or 1))}


@contextmanager
def ray_session(address: Optional[str] = None, workers: Optional[int] = None) -> Iterator[dict]:
    """Connect to Ray for the length of a command; yields one job's resource options.

    Args:
        address: None: a local Ray started here and stopped at the end (or the one this process already
            runs); ``auto`` or ``ray://host:10001``: join a cluster.
        workers: jobs at once on a machine without GPUs (None: 1); with GPUs one job per GPU.
    """
    import ray

    import dreambooth_pl

    # workers import the package the driver imports (a checkout may shadow an installed copy)
    src = str(Path(dreambooth_pl.__file__).resolve().parents[1])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = dict(runtime_env={"env_vars": env}, log_to_driver=False)
        if address:
            ray.init(address=address, **kwargs)
        else:  # small: the jobs pass paths and status records, never tensors, through the object store
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=128 * 2**20, **kwargs)
    try:
        yield job_resources(workers)
    finally:
        if started:
            ray.shutdown()


def run_jobs(jobs: list[FitJob], address: Optional[str] = None, workers: Optional[int] = None, retries: int = 2,
             priors: Optional[dict[str, Task]] = None, needs: Optional[dict[str, str]] = None,
             title: str = "jobs") -> dict[str, dict]:
    """Run every unfinished job on Ray; returns each job's status record (finished ones read back).

    Args:
        jobs: the fits.
        address: Ray address (None: local Ray for this command).
        workers: jobs at once without GPUs (None: 1).
        retries: how often a job whose fit process died is retried (resuming each time).
        priors: upstream tasks by key, each run once (class priors).
        needs: job name -> key of the upstream task it waits for.
        title: first line of the live table.
    """
    from .job_table import JobTable

    todo = [j for j in jobs if not is_done(j.run)]
    results = {j.name: read_status(j.run) for j in jobs if j not in todo}
    if not todo:
        return results
    import ray

    session = f"{os.getpid()}-{time.time():.0f}"
    table = JobTable(title, [j.name for j in jobs], workers)
    with ray_session(address, workers) as opts:
        # max_calls=1 where the jobs take GPUs: each job's worker exits after it, so no GPU memory or CUDA context
        # outlives its job; without GPUs a worker takes the next job with torch already imported (0: Ray's default)
        on_gpu = bool(opts.get("num_gpus"))
        draw = ray.remote(max_calls=1 if on_gpu else 0)(_call)
        upstream = {k: draw.options(name=t.name, max_retries=retries, **opts).remote(t)
                    for k, t in (priors or {}).items() if any((needs or {}).get(j.name) == k for j in todo)}
        # a fit runs in its own process, so its worker holds no CUDA context and may take the next job: a fresh
        # worker per job re-imported torch each time (about 4 s between cells of a 4-cell grid on an H100, 2026-12-05).
        # An after-fit step (evaluation) runs in the worker, on the GPU where there is one: then one job per worker.
        fit = ray.remote(max_calls=1 if on_gpu and any(j.then is not None for j in todo) else 0)(run_fit_job)
        refs = {fit.options(name=j.name, max_retries=retries, retry_exceptions=[FitProcessDied], **opts).remote(
            j, session, *([upstream[needs[j.name]]] if (needs or {}).get(j.name) in upstream else [])): j
            for j in todo}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in done:
                job = refs[ref]
                try:
                    results[job.name] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a job that failed for good must not stop the others
                    cause = getattr(e, "cause", None) or e
                    error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500] if str(cause).strip() else ''}"
                    results[job.name] = {**read_status(job.run), "name": job.name, "status": "failed",
                                         "error": f"{error} (log: {job.log})", "log": str(job.log), **job.info}
                    write_json(job.status_file, results[job.name])
            table.update({j.name: results.get(j.name) or read_status(j.run) for j in jobs}, session)
    table.close({j.name: results.get(j.name) or read_status(j.run) for j in jobs}, session)
    return results
