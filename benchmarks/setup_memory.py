"""Where a fit's peak GPU memory comes from: the live allocations at the peak, grouped by the project's frames.

    python benchmarks/setup_memory.py BASE OUT [OVERRIDE ...]    e.g. --model.base_dtype=nf4

Runs ``configs/perf/8gb.yaml`` for 3 steps on BASE under ``torch.cuda.memory._record_memory_history``, replays the
allocation trace to the moment the most memory was allocated, and prints the allocations alive then, summed by
the innermost ``dreambooth_pl`` frame (and the library frame beneath it) that made them. Also prints the
allocated and reserved peaks. Issue 24: the 8gb preset on an nf4 base peaked 8.8 GiB reserved, float8's 4.0.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _where(frames: list[dict]) -> str:
    ours = [f for f in frames if "dreambooth_pl" in f["filename"]]
    if not ours:
        return "elsewhere: " + (f"{frames[0]['name']} ({Path(frames[0]['filename']).name})" if frames else "?")
    i = frames.index(ours[0])
    lib = frames[i - 1] if i > 0 else None
    here = f"{Path(ours[0]['filename']).name}:{ours[0]['line']} {ours[0]['name']}"
    return here + (f" <- {Path(lib['filename']).name}:{lib['line']} {lib['name']}" if lib else "")


def peak_allocations(trace: list[dict]) -> tuple[int, dict[str, int]]:
    """(bytes allocated at the peak, bytes alive then by where they were made), from a device trace."""
    live: dict[int, tuple[int, str]] = {}
    now = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames", [])))
            now += e["size"]
            if now > best:
                best, best_live = now, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])[0]
    by = collections.Counter()
    for size, where in best_live.values():
        by[where] += size
    return best, dict(by)


def main(base: str, out: str, overrides: list[str]) -> None:
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.tools.benchmark import prepare_inputs

    instance_dir, class_dir = prepare_inputs(Path(out) / "inputs")
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    DreamBoothCLI(args=["fit", "--config", str(REPO / "configs" / "perf" / "8gb.yaml"), "--model.base_model", base,
                        "--data.photos.dir", instance_dir, "--data.priors.dir", class_dir,
                        "--data.priors.num_images", "4", "--trainer.max_steps=3", "--trainer.enable_progress_bar=false",
                        "--trainer.logger.init_args.save_dir", str(Path(out) / "runs"), *overrides])
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    gib = 2**30
    print(f"{' '.join(overrides)}: allocated peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB, reserved peak "
          f"{torch.cuda.max_memory_reserved() / gib:.2f} GiB")
    trace = [e for dev in snap["device_traces"] for e in dev]
    best, by = peak_allocations(trace)
    print(f"replayed peak {best / gib:.2f} GiB ({len(trace)} events); alive then, by where made:")
    for where, size in sorted(by.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {size / gib:7.3f} GiB  {where}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
