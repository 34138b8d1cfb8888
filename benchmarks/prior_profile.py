"""Where a class-prior batch's GPU time goes: python benchmarks/prior_profile.py BASE OUT [STEPS] [--cache-only]

Draws one warm-up batch, then profiles one batch of the default sampler's batch size at 1024² (Euler, ``STEPS``
steps, guidance 5) eagerly (a CUDA graph's replay hides its kernels from the profiler; the kernels are the same),
for the default sampler and with diffusers' GEGLU (``fused_geglu=False``); prints the kernels by kind (benchmarks/kernel_kinds.py) and the
top kernels, and writes both to OUT/prior-profile-<variant>.txt. Then times the cache's image encoding (data/cache.py)
of the first 48 images of the newest end-to-end run's class folder (``benchmark``'s work folder; run after
``gpu.sh e2e``), one by one against decoded ahead, with the fp32 VAE the recipe encodes with.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_kinds import kinds  # noqa: E402

from dreambooth_pl.prior_sampler import PriorSampler  # noqa: E402


def profile(base: str, out: Path, steps: int, **switch) -> None:
    name = "-".join(f"{k}={v}" for k, v in switch.items()) or "default"
    s = PriorSampler(base, "euler", graph=False, **switch)
    seeds = list(range(s.batch_size))
    s.latents("a photo of person", seeds, steps, 5.0, None, 1024, 1024)  # warm-up: cuDNN's heuristics, allocator
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        s.latents("a photo of person", seeds, steps, 5.0, None, 1024, 1024)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    rows = [{"name": e.key, "self_device_us": e.self_device_time_total, "count": e.count}
            for e in prof.key_averages()]
    table = kinds(rows)
    total = sum(ms for ms, _ in table.values())
    per_forward = total / steps / (2 * len(seeds))
    lines = [f"## {name}: batch {len(seeds)} (x2 for guidance), {steps} steps, 1024², eager under the profiler "
             f"(wall {wall:.2f} s); GPU {total:.0f} ms, {per_forward:.2f} ms per image-forward", "",
             "| kind | GPU ms | share | kernels |", "|---|---|---|---|"]
    lines += [f"| {k} | {ms:.1f} | {ms / total:.1%} | {n} |" for k, (ms, n) in table.items()]
    lines += ["", "| top kernels | GPU ms | calls |", "|---|---|---|"]
    top = sorted((r for r in rows if r["self_device_us"] > 0), key=lambda r: -r["self_device_us"])[:25]
    lines += [f"| {r['name'][:110]} | {r['self_device_us'] / 1e3:.1f} | {r['count']} |" for r in top]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / f"prior-profile-{name}.txt").write_text(text + "\n")
    del s
    torch.cuda.empty_cache()


def cache_ab(base: str, n: int = 48) -> None:
    """The cache's encoding of ``n`` class images, one by one against decoded ahead (same fp32 VAE, same latents)."""
    from dreambooth_pl.data.cache import encode_set
    from dreambooth_pl.data.datasets import ImageSet
    from dreambooth_pl.sdxl import load_parts

    folders = sorted(Path("data/_cache/bench").glob("e2e-*/class"))  # benchmark --work's default
    paths = sorted(p for f in folders[-1:] for p in f.glob("*.png"))[:n]
    if not paths:
        print("cache A/B: no end-to-end class folder found; skipped", flush=True)
        return
    vae = load_parts(base, None, torch.float16, "cuda", torch.float32).vae
    images = ImageSet(tuple(paths), "a photo of person")
    got, enc = {}, {}
    for prefetch in (0, 4, 0, 4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        enc[prefetch] = encode_set(vae, images, [[(1024, 1024)]] * len(paths), prefetch=prefetch)
        got.setdefault(prefetch, []).append((time.perf_counter() - t) / len(paths))
    same = max((enc[4].entries[k].mean - v.mean).abs().max().item() for k, v in enc[0].entries.items())
    print(f"cache A/B ({len(paths)} images of {folders[-1]}, fp32 VAE, plain + mirrored, s/image): one by one "
          f"{got[0]}, decoded ahead {got[4]}; max |difference| {same}", flush=True)
    # where one pair's encode goes on the GPU (the mid-block attention over 16,384 fp32 tokens is a suspect), and
    # the same encode with PyTorch's math attention (TF32 matmuls under the fit's "high" matmul precision)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_float32_matmul_precision("high")
    first = ImageSet(tuple(paths[:8]), "a photo of person")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        encode_set(vae, ImageSet(tuple(paths[:1]), "p"), [[(1024, 1024)]])
        torch.cuda.synchronize()
    rows = [{"name": e.key, "self_device_us": e.self_device_time_total, "count": e.count}
            for e in prof.key_averages()]
    print("one pair's encode, GPU ms by kind:", {k: round(ms, 1) for k, (ms, n) in kinds(rows).items()},
          "top:", [(r["name"][:70], round(r["self_device_us"] / 1e3, 1))
                   for r in sorted(rows, key=lambda r: -r["self_device_us"])[:6]], flush=True)
    for name, ctx in (("default", None), ("math attention", SDPBackend.MATH)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with sdpa_kernel(ctx) if ctx is not None else torch.no_grad():
            e = encode_set(vae, first, [[(1024, 1024)]] * 8)
        torch.cuda.synchronize()
        diff = max((e.entries[k].mean - enc[0].entries[k].mean).abs().max().item() for k in e.entries)
        print(f"cache encode, {name}: {(time.perf_counter() - t) / 8:.3f} s/image, max |mean - default| {diff:.2e}",
              flush=True)


if __name__ == "__main__":
    base, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    steps = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 5
    if "--cache-only" not in sys.argv:
        profile(base, out, steps)
        profile(base, out, steps, fused_geglu=False)
    cache_ab(base)
