"""Where a class-prior batch's GPU time goes: python benchmarks/prior_profile.py BASE OUT [STEPS] [--cache-only]

Draws one warm-up batch, then profiles one batch of the default sampler's batch size at 1024² (Euler, ``STEPS``
steps, guidance 5) eagerly (a CUDA graph's replay hides its kernels from the profiler; the kernels are the same),
for the default sampler and with diffusers' GEGLU (``fused_geglu=False``); prints the kernels by kind (benchmarks/kernel_kinds.py) and the
top kernels, and writes both to OUT/prior-profile-<variant>.txt. Then times the cache's image encoding (data/cache.py)
of the first 48 images of the newest end-to-end run's class folder (``benchmark``'s work folder; run after
``gpu.sh e2e``): fp32 with mirrored latents, fp32 and bf16 plain (:func:`cache_ab`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_kinds import kinds  # noqa: E402

from dreambooth_pl.prior_sampler import PriorSampler  # noqa: E402


def default_switches() -> dict:
    """The default sampler's GEGLU on this machine (prior_defaults.default_fused_geglu)."""
    from dreambooth_pl.prior_defaults import default_fused_geglu

    return {"fused_geglu": default_fused_geglu(torch.device("cuda"), False, "float16")}


def profile(base: str, out: Path, steps: int, **switch) -> None:
    # named by what ran, not "default": the default changes (call 1's default was diffusers' GEGLU)
    name = "-".join(f"{k}={v}" for k, v in switch.items()) or "default-" + "-".join(
        f"{k}={v}" for k, v in default_switches().items())
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
    """The cache's encoding of ``n`` class images (decoded ahead, as the fit does): the fp32 VAE with mirrored
    latents (the recipe until 2026-12-06 session 4) against plain only (``data.crops.flip: 0``) in fp32 and in bf16
    (``model.vae_dtype: auto`` on this GPU), and bf16 with four images per VAE call (``images_per_call``, not yet
    the fit's), each timed twice; how far bf16's latent means are from fp32's, and four per call from one; the same
    with the fused norms (the fit's), and with them in an NHWC VAE (not the fit's), and how far each is from fp32."""
    from dreambooth_pl.data.encode import encode_set
    from dreambooth_pl.data.datasets import ImageSet
    from dreambooth_pl.fused_norms import fuse_norms, to_nhwc
    from dreambooth_pl.sdxl import load_parts

    folders = sorted(Path("data/_cache/bench").glob("e2e-*/class"))  # benchmark --work's default
    paths = sorted(p for f in folders[-1:] for p in f.glob("*.png"))[:n]
    if not paths:
        print("cache A/B: no end-to-end class folder found; skipped", flush=True)
        return
    vae32 = load_parts(base, None, torch.float16, "cuda", torch.float32).vae
    vae16 = load_parts(base, None, torch.float16, "cuda", torch.bfloat16).vae
    fused = load_parts(base, None, torch.float16, "cuda", torch.bfloat16).vae
    fuse_norms(fused)  # model.perf.fused_norms: the fit's encode with the Triton GroupNorms
    nhwc = to_nhwc(load_parts(base, None, torch.float16, "cuda", torch.bfloat16).vae)  # not yet the fit's: NHWC
    fuse_norms(nhwc)  # convolutions (cuDNN's Hopper kernels), the norms keeping the layout
    images = ImageSet(tuple(paths), "a photo of person")
    sizes = [[(1024, 1024)]] * len(paths)
    runs = {"fp32 plain+mirrored": (vae32, True, 1), "fp32 plain": (vae32, False, 1), "bf16 plain": (vae16, False, 1),
            "bf16 plain, 4 per call": (vae16, False, 4), "bf16 plain, 4 per call, fused norms": (fused, False, 4),
            "bf16 plain, 4 per call, fused norms, NHWC": (nhwc, False, 4)}
    got, enc = {}, {}
    for _ in range(2):
        for name, (vae, mirrored, per_call) in runs.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            enc[name] = encode_set(vae, images, sizes, mirrored=mirrored, images_per_call=per_call)
            torch.cuda.synchronize()
            got.setdefault(name, []).append(round((time.perf_counter() - t) / len(paths), 4))
    ref, low = enc["fp32 plain"].entries, enc["bf16 plain"].entries
    diff = torch.stack([(low[k].mean - v.mean).abs().max() for k, v in ref.items()])
    rel = torch.stack([(low[k].mean - v.mean).norm() / v.mean.norm() for k, v in ref.items()])
    spread = torch.stack([v.std.mean() for v in ref.values()]).mean()
    four = enc["bf16 plain, 4 per call"].entries
    batch_rel = torch.stack([(four[k].mean - v.mean).norm() / v.mean.norm() for k, v in low.items()]).max()
    kernels = enc["bf16 plain, 4 per call, fused norms"].entries
    fused_rel = torch.stack([(kernels[k].mean - v.mean).norm() / v.mean.norm() for k, v in four.items()]).max()

    def from_fp32(name: str) -> str:  # which bf16 encode is nearest fp32's: mean relative L2 of the latent means
        low = enc[name].entries
        return f"{torch.stack([(low[k].mean - v.mean).norm() / v.mean.norm() for k, v in ref.items()]).mean():.2e}"
    print(f"cache A/B ({len(paths)} images of {folders[-1]}, decoded ahead, s/image, two runs each): {got}; "
          f"bf16 against fp32 latent means: max |difference| {diff.max():.3e}, relative L2 {rel.mean():.2e} (max "
          f"{rel.max():.2e}); the latent distributions' own mean std {spread:.3e}; bf16 4 per call against 1 per "
          f"call: relative L2 max {batch_rel:.2e}; fused norms against eager (bf16, 4 per call): relative L2 max "
          f"{fused_rel:.2e}; against fp32, relative L2 mean: eager {from_fp32('bf16 plain, 4 per call')}, fused "
          f"{from_fp32('bf16 plain, 4 per call, fused norms')}, fused NHWC "
          f"{from_fp32('bf16 plain, 4 per call, fused norms, NHWC')}", flush=True)
    vae_batches(vae16, images)


@torch.no_grad()
def vae_batches(vae, images, n: int = 8, batches=(1, 2, 4, 8), side: int = 1024) -> None:
    """The device's own encode cost per image at several VAE batch sizes (pixels already on the device, so no
    decoding or copies): whether the cache would gain from encoding several images per call (its GroupNorms over
    128 channels x 1024² run 32 blocks per image), and how far a batch's latents are from one image's."""
    from dreambooth_pl.data.encode import _prepared

    device = next(vae.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pixels = torch.cat([_prepared(p, [(side, side)], False)[1][0][1] for p in images.paths[:n]])
    pixels = pixels.to(device).to(vae.dtype)
    per_image, means = {}, {}
    for b in batches:
        for _ in range(2):  # the first pass untimed: cuDNN's plans and the allocator for this batch shape
            sync()
            t = time.perf_counter()
            out = [vae.encode(x).latent_dist.mean.float() for x in pixels.split(b)]
            sync()
        per_image[b] = round((time.perf_counter() - t) / len(pixels), 4)
        means[b] = torch.cat(out)
    rel = {b: f"{float((m - means[1]).norm() / means[1].norm()):.1e}" for b, m in means.items() if b != 1}
    peak = f"; peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"VAE encode on {device.type}, {vae.dtype}, {len(pixels)} images at {side}²: s/image by batch "
          f"{per_image}; latent means against batch 1, relative L2 {rel}{peak}", flush=True)


if __name__ == "__main__":
    base, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    steps = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 5
    if "--cache-only" not in sys.argv:
        profile(base, out, steps)
        profile(base, out, steps, fused_geglu=False)
    cache_ab(base)
