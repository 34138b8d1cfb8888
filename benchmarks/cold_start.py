"""What a fresh process pays once before its first GPU work, each part timed alone in order: the import of torch,
CUDA's context, cuBLAS's first fp16 GEMM, cuDNN's first convolution, the first SDPA, and the Triton GEGLU kernels'
first build (forward, backward). The fit pays these inside its priors' first batch and first step; a thread that
paid them during the imports (~6 s of host-only work) would take them off the clock.

    python3 benchmarks/cold_start.py [BASE [OUT]]   (one JSON line; with a base folder, also the prior sampler's
    load after those costs are paid, its profile's top entries written to OUT/sampler-load-profile.txt)
"""
import json
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

out = {"import_torch_s": time.perf_counter() - t0}


def timed(name, fn):
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    out[name] = round(time.perf_counter() - t, 3)


timed("cuda_init_s", lambda: torch.cuda.init() or torch.zeros(1, device="cuda"))
a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
timed("first_gemm_s", lambda: a @ a)
timed("second_gemm_s", lambda: a @ a)
x = torch.randn(1, 8, 32, 32, device="cuda", dtype=torch.float16)
w = torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float16)
timed("first_conv_s", lambda: torch.nn.functional.conv2d(x, w, padding=1))
q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16)
timed("first_sdpa_s", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
t = time.perf_counter()
from dreambooth_pl import geglu_kernel  # noqa: E402

out["import_geglu_kernel_s"] = round(time.perf_counter() - t, 3)
h = torch.randn(64, 256, device="cuda", dtype=torch.float16, requires_grad=True)
g = torch.randn(64, 256, device="cuda", dtype=torch.float16, requires_grad=True)
y = None


def fwd():
    global y
    y = geglu_kernel.GatedGelu.apply(h, g)


timed("triton_geglu_forward_first_s", fwd)
timed("triton_geglu_backward_first_s", lambda: y.sum().backward())
timed("triton_geglu_forward_second_s", fwd)
if len(sys.argv) > 1:  # the sampler's load on a warm process: what the e2e run's "sampler load" holds beside them
    import cProfile
    import pstats

    from dreambooth_pl.prior_sampler import PriorSampler

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    sampler = PriorSampler(sys.argv[1], "euler", batch_size=8)
    torch.cuda.synchronize()
    prof.disable()
    out["sampler_load_s"] = round(time.perf_counter() - t, 3)
    if len(sys.argv) > 2:
        with open(f"{sys.argv[2]}/sampler-load-profile.txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
print(json.dumps(out))
