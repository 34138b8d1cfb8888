"""Where a fresh machine's first training pass goes, Triton aside: the full-size UNet as the fused plan trains it (fp16
weights, fused norms and GEGLU in NHWC, kernels built ahead by kernel_warmup.py), one forward and backward under
fp16 autocast at 1024² timed three times, the first under the profiler. On an H100 (BENCHMARKS.md 2026-12-07
session 10) the fit's graph warm-up pass took 4.07 s on a fresh machine and 1.46 s on the next fit there, with no
Triton build in either: this names the host-side ops of the difference (cuDNN's and cuBLAS's first calls per shape,
the attention's graph builds).

    python3 benchmarks/first_pass.py BASE [OUT]   (one JSON line; with OUT, OUT/first-pass-profile.txt: the first
    pass's ops by host time; FIRST_PASS_SIZE=64 and no GPU: a CPU smoke run on a tiny base)
"""
import json
import os
import sys
import time

import torch

from dreambooth_pl import block_ops, fused_norms, kernel_warmup
from dreambooth_pl.sdxl import load_parts

base = sys.argv[1]
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
size = int(os.environ.get("FIRST_PASS_SIZE", 1024))
half = torch.float16 if dev.type == "cuda" else torch.float32  # (the CPU smoke run: fp32, no autocast)
out: dict = {"device": str(dev), "size": size}
t = time.perf_counter()
unet = load_parts(base, None, half, dev).unet.requires_grad_(False)
out["load_s"] = round(time.perf_counter() - t, 3)
fused_norms.fuse_norms(unet)
block_ops.fuse_geglu(unet)
fused_norms.to_nhwc(unet)
t = time.perf_counter()
w = kernel_warmup.start(unet, {(size, size)}, half, True, dev)
if w is not None:
    w.join()
out["kernel_build_s"] = round(time.perf_counter() - t, 3)
out["kernel_warmup_error"] = w.error if w is not None else None
cfg = unet.config
text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
x = torch.randn(2, 4, size // 8, size // 8, device=dev, dtype=half).contiguous(memory_format=torch.channels_last)
args = (torch.tensor([500.0, 20.0], device=dev), torch.randn(2, 77, cfg.cross_attention_dim, device=dev))
extra = {"text_embeds": torch.randn(2, text, device=dev), "time_ids": torch.randn(2, 6, device=dev)}


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def builds() -> int:
    return kernel_warmup.built(dev) if dev.type == "cuda" else 0


def one_pass() -> float:
    """One forward and backward to the input (the adapters' gradients flow the same way), synchronised."""
    t = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
        y = unet(x.detach().requires_grad_(True), *args, added_cond_kwargs=extra).sample
    y.float().square().mean().backward()
    sync()
    return round(time.perf_counter() - t, 3)


before = builds()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    out["first_pass_s"] = one_pass()
out["first_pass_triton_builds"] = builds() - before
out["second_pass_s"], out["third_pass_s"] = one_pass(), one_pass()
table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
if len(sys.argv) > 2:
    with open(f"{sys.argv[2]}/first-pass-profile.txt", "w") as f:
        f.write(table)
print("\n".join(table.splitlines()[:18]))
print(json.dumps(out))
