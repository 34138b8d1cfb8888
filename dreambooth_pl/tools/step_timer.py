"""``StepTimer``: the benchmark's clock on the real fit (tools/benchmark.py), and per-step times without host syncs.

The mean over the timed steps (one device sync at each end) is the headline number; each step's own time, read
from CUDA events recorded at every step's end and synchronised only after the last, shows whether a mean hides a
stall (a step of 0.3 s among steps of 0.11 s moves a 15-step mean by 13%).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Optional

import lightning as L
import torch


def _elapsed(a, b) -> float:
    """Seconds between two marks: CUDA events (device time between their records) or host times."""
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def step_stats(step_s: list[float]) -> dict:
    """Median, slowest and count of per-step seconds (empty when there are none)."""
    if not step_s:
        return {}
    return {"step_s_median": statistics.median(step_s), "step_s_max": max(step_s), "step_s_n": len(step_s)}


class StepTimer(L.Callback):
    """Times steady-state steps without adding host syncs inside them: one device sync when warm-up ends and
    one at the end (``seconds``: the mean), plus each step's own time from events (``step_s``); counts one step's
    FLOPs with torch's FlopCounterMode (compiled blocks run eagerly then).

    Args:
        warmup: steps excluded from the timing (compilation, allocator growth, cuDNN autotuning).
        flop_step: index of the step whose FLOPs are counted (inside the warm-up).
        profile: write a torch.profiler table, a trace and the GPU idle time of the timed steps to this file.
    """

    def __init__(self, warmup: int, flop_step: int = 0, profile: Optional[str] = None):
        self.warmup, self.flop_step, self.profile = warmup, flop_step, profile
        self._prof = None
        self._marks: list = []  # one CUDA event (or host time) at the end of each timed optimizer step
        self._last_step = 0
        self.step_s: list[float] = []
        self.warmup_s: list[float] = []
        self.flops = 0
        self.steps = 0
        self.seconds = float("nan")
        self.peak_overall = (0, 0)
        self.peak_setup = 0
        self._stack: contextlib.ExitStack | None = None
        self._t = 0.0

    def _sync(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":  # model load + input caching, before the first step
            self.peak_setup = torch.cuda.max_memory_reserved()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self._t = self._sync(pl_module.device)
            if self.warmup == 0:  # the first timed step starts here
                self._marks.append(self._mark(pl_module.device))
        if batch_idx == self.flop_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._stack = contextlib.ExitStack()
            self._stack.enter_context(torch.compiler.set_stance("force_eager"))
            self._counter = self._stack.enter_context(FlopCounterMode(display=False))
        if self.profile and batch_idx == self.warmup:  # steady state: the host may run ahead of the GPU here
            import cProfile

            self._prof = torch.profiler.profile(record_shapes=True)  # F.ops.txt groups by shapes
            self._prof.__enter__()
            self._py = cProfile.Profile()
            self._py.enable()

    def _mark(self, device: torch.device):
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # no sync: read after the last step
        return event

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if stepped and trainer.global_step >= max(self.warmup, 1):  # optimizer steps, not accumulated micro-batches
            self._marks.append(self._mark(pl_module.device))  # the warm-up's last step end starts the first timed one
        if self._stack is not None and batch_idx == self.flop_step:
            self._stack.close()
            self._stack = None
            # a CUDA-graph capture step runs the UNet twice (warm-up, capture) and replays once unseen by the counter
            passes = 2 if pl_module.perf.cuda_graph and pl_module.device.type == "cuda" else 1
            self.flops = self._counter.get_total_flops() / passes
        if trainer.global_step == trainer.max_steps:  # the last step: stop the clock before the export
            self.steps = trainer.global_step - self.warmup
            self.seconds = (self._sync(pl_module.device) - self._t) / max(self.steps, 1)
            self.step_s = [_elapsed(a, b) for a, b in zip(self._marks, self._marks[1:])]
            if self._prof is not None:
                self._write_profile(pl_module.device)
        if batch_idx < self.warmup:  # warm-up steps are synced one by one: their times show compile cost
            now = self._sync(pl_module.device)
            self.warmup_s.append(now - self._t)
            self._t = now
            # one warm-up step before the timed ones: the steps after a release re-allocate their blocks
            if batch_idx == max(self.warmup - 2, 0) and pl_module.device.type == "cuda":
                self.peak_overall = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
                torch.cuda.empty_cache()  # blocks cached by compilation/caching would hide the steady-state peak
                torch.cuda.reset_peak_memory_stats()

    def _write_profile(self, device: torch.device) -> None:
        from .step_profile import write_profile

        write_profile(self._prof, self._py, self.profile, device, max(self.steps, 1))
        self._prof = None
