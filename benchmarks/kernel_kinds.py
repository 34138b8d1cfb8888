"""Group a ``benchmark --profile`` run's kernels by kind: python benchmarks/kernel_kinds.py PROFILE.json [...]

Prints one markdown table per file: GPU milliseconds and kernel launches per kind (gemm, attention, convolution,
copies/casts, normalisation, other elementwise, optimizer), from the per-kernel rows ``StepTimer`` (tools/step_timer.py) writes beside
its torch.profiler table. Annotations (``aten::`` ops, autograd nodes, the optimizer's and the graph replay's
ranges) are skipped so that every kernel counts once.
"""
from __future__ import annotations

import collections
import json
import re
import sys

KINDS = [("attention", r"sdpa|flash|cudnn::fusion|fmha"), ("convolution", r"xmma|conv|implicit_gemm"),
         ("gemm", r"gemm|nvjet|splitK|cublas|Kernel2"), ("copy/cast/cat", r"copy|Cat"),
         ("normalisation", r"norm|Moments|GroupN|ComputeInternal"), ("optimizer", r"multi_tensor|foreach|adam"),
         ("other elementwise", r".")]
SKIP = re.compile(r"^(aten::|autograd::|Optimizer|_Replay|cuda|ProfilerStep|Command Buffer|Activity Buffer|## )")


def kinds(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """{kind: (GPU ms, kernel launches)} of one profiled step, largest first."""
    ms, n = collections.Counter(), collections.Counter()
    for r in rows:
        if r["self_device_us"] <= 0 or SKIP.match(r["name"]):
            continue
        kind = next(k for k, pattern in KINDS if re.search(pattern, r["name"], re.I))
        ms[kind] += r["self_device_us"] / 1e3
        n[kind] += r["count"]
    return {k: (ms[k], n[k]) for k, _ in ms.most_common()}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        table = kinds(json.load(open(path)))
        print(f"\n{path}\n\n| kind | GPU ms | kernels |\n|---|---|---|")
        for k, (t, c) in table.items():
            print(f"| {k} | {t:.1f} | {c} |")
        print(f"| **all** | **{sum(t for t, _ in table.values()):.1f}** | **{sum(c for _, c in table.values())}** |")
