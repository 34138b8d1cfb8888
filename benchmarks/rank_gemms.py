"""Kernel time of the rank-r LoRA GEMMs of the SDXL step, per shape, rank and operand layout (GPU only).

The fast step's eager profile (BENCHMARKS.md, session 5) puts the rank-4 adapter GEMMs at ~25 ms of a ~110 ms step,
each ~8 µs although it moves only ~5 MB (~1 µs of HBM time on an H200). This times each of the fused node's six
adapter GEMMs (fused_lora._LoraLinear) at rank 4, 8 and 16 and in the transposed layouts cuBLAS may handle better,
from a CUDA graph of ``--reps`` back-to-back calls (kernel time only, no launch gaps).

    python benchmarks/rank_gemms.py [--reps 200]
"""
from __future__ import annotations

import argparse

import torch

# (tokens, features in, features out): the 64x64 and 32x32 blocks' self-attention projections at 1024², batch 2
SHAPES = [(8192, 640, 640), (2048, 1280, 1280)]


def graphed_us(fn, reps: int) -> float:
    """Microseconds per call of ``fn`` replayed ``reps`` times from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def ops(m: int, k: int, n: int, r: int) -> dict:
    """The fused node's six adapter GEMMs for one layer (x: [m, k], W: [n, k]) and transposed-layout variants."""
    dev, dt = "cuda", torch.bfloat16
    x, g = torch.randn(m, k, device=dev, dtype=dt), torch.randn(m, n, device=dev, dtype=dt)
    a, b = torch.randn(r, k, device=dev, dtype=dt), torch.randn(n, r, device=dev, dtype=dt)
    out, gx = torch.randn(m, n, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt)
    xa, gb = torch.randn(m, r, device=dev, dtype=dt), torch.randn(m, r, device=dev, dtype=dt)
    xa_t, gb_t = xa.t().contiguous(), gb.t().contiguous()  # [r, m]: the adapter activations stored transposed
    bt = b.t().contiguous()  # [r, n]: B stored transposed (fused_lora's bulk copy)
    w, empty = torch.randn(n, k, device=dev, dtype=dt), x.new_empty(())
    return {
        "down x@Aᵀ": lambda: torch.addmm(empty, x, a.t(), beta=0, alpha=0.5),
        "down (A@xᵀ)ᵀ": lambda: torch.mm(a, x.t()),
        "up out+=xa@Bᵀ": lambda: out.addmm_(xa, b.t()),
        "up out+=(xaᵀ)ᵀ@Bᵀ": lambda: out.addmm_(xa_t.t(), b.t()),
        "up out+=(xaᵀ)ᵀ@Bᵀ(contig)": lambda: out.addmm_(xa_t.t(), bt),
        "Bᵀ(contig)@gᵀ": lambda: torch.mm(bt, g.t()),
        "g@B": lambda: torch.addmm(empty, g, b, beta=0, alpha=0.5),
        "(Bᵀ@gᵀ)ᵀ": lambda: torch.mm(b.t(), g.t()),
        "gx+=gb@A": lambda: gx.addmm_(gb, a),
        "gx+=(gbᵀ)ᵀ@A": lambda: gx.addmm_(gb_t.t(), a),
        "gA=gbᵀ@x": lambda: torch.mm(gb.t(), x),
        "gA=gbᵀ(contig)@x": lambda: torch.mm(gb_t, x),
        "gB=gᵀ@xa": lambda: torch.mm(g.t(), xa),
        "gB=(xaᵀ@g)ᵀ": lambda: torch.mm(xa_t, g),
        "frozen x@Wᵀ (ref)": lambda: torch.mm(x, w.t()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; µs per call, bf16, from a CUDA graph")
    for m, k, n in SHAPES:
        rows = {r: {name: graphed_us(fn, args.reps) for name, fn in ops(m, k, n, r).items()} for r in (4, 8, 16)}
        print(f"\nx [{m}, {k}], W [{n}, {k}]      " + "".join(f"{f'r={r}':>9}" for r in rows))
        for name in rows[4]:
            print(f"  {name:<24}" + "".join(f"{rows[r][name]:9.2f}" for r in rows))


if __name__ == "__main__":
    main()
