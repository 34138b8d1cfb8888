"""``benchmark --profile F``: what the timed steps spent, written beside F (dreambooth_pl/tools/benchmark.py).

F: torch.profiler's top ops plus the GPU's idle gaps, each with the host op that was running (a gap means the GPU
waited on the host: a sync, a blocking copy, host-side batch work); F.ops.txt: GPU time per aten op and input
shapes (which op launched the kernels; only an eager step has it, a graph replay hides its ops); F.json: every
row, for ``benchmarks/kernel_kinds.py``; F.python.txt: cProfile's hot spots; F.trace.json.gz: the whole trace.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def write_profile(prof, py, path: str, device: torch.device, steps: int) -> None:
    """Stop ``prof`` (torch.profiler) and ``py`` (cProfile) and write their reports for ``steps`` steps to ``path``."""
    import gzip
    import io
    import pstats

    py.disable()
    prof.__exit__(None, None, None)
    text = io.StringIO()
    pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(30)
    Path(path + ".python.txt").write_text(text.getvalue())
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rows = prof.key_averages()
    table = rows.table(sort_by=sort, row_limit=40, max_name_column_width=90)
    Path(path).write_text(table + "\n" + gpu_idle(prof, steps))
    Path(path + ".ops.txt").write_text(op_table(prof, steps, device.type == "cuda"))
    # every row, for grouping kernel time by kind (gemm, attention, elementwise, ...) outside this run
    Path(path + ".json").write_text(json.dumps(
        [{"name": r.key, "count": r.count, "self_device_us": getattr(r, "self_device_time_total", 0),
          "self_cpu_us": r.self_cpu_time_total} for r in rows]))
    trace = Path(path + ".trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        dst.write(src.read())
    trace.unlink()


def gpu_idle(prof, steps: int) -> str:
    """How long the GPU sat idle per profiled step, and the longest gaps with the host op running at their start."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not kernels:
        return "no device kernels recorded\n"
    busy, gaps, (start, end) = 0.0, [], kernels[0]
    for s, e in kernels[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, end))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = end - kernels[0][0]
    host = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CPU), key=lambda t: t[0])
    lines = [f"GPU busy {busy / 1e3 / steps:.1f} ms/step, idle {(span - busy) / 1e3 / steps:.1f} ms/step over "
             f"{span / 1e3:.1f} ms ({steps} step(s)); gaps > 20 us: {sum(g > 20 for g, _ in gaps)}, "
             f"{sum(g for g, _ in gaps if g > 20) / 1e3:.1f} ms; the longest, with the innermost host op then:"]
    for g, at in sorted(gaps, reverse=True)[:15]:
        ops = [n for s, e, n in host if s <= at <= e]
        lines.append(f"  {g / 1e3:8.2f} ms at +{(at - kernels[0][0]) / 1e3:8.1f} ms  {' > '.join(ops[-3:])[:150]}")
    return "\n".join(lines) + "\n"


def op_table(prof, steps: int, gpu: bool = True, limit: int = 60) -> str:
    """Milliseconds per step of each aten op and input shapes, largest first: the kernels' GPU time it launched
    (``gpu``) or its own CPU time (needs ``record_shapes``)."""
    field = "self_device_time_total" if gpu else "self_cpu_time_total"
    rows = [r for r in prof.key_averages(group_by_input_shape=True)
            if r.key.startswith("aten::") and getattr(r, field, 0) > 0]
    rows.sort(key=lambda r: getattr(r, field), reverse=True)
    total = sum(getattr(r, field) for r in rows)
    where = "GPU" if gpu else "CPU"
    lines = [f"aten ops' own {where} time: {total / 1e3 / steps:.1f} ms/step (a replayed graph's kernels have no op)",
             f"{where + ' ms/step':>11} {'calls/step':>10}  op  input shapes"]
    for r in rows[:limit]:
        lines.append(f"{getattr(r, field) / 1e3 / steps:11.2f} {r.count / steps:10.0f}  {r.key}  "
                     f"{str(r.input_shapes)[:160]}")
    return "\n".join(lines) + "\n"
