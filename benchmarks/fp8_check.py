"""fp8_gemm.py on a GPU: the Triton quantization against the eager reference (codes differ only at ties), the float8 layer
against fp32 maths, and the ms of SDXL's transformer GEMMs (a prior draw's batch of 8 × 2 for guidance) in fp16,
as float8 GEMMs alone, and with the input's quantization: python benchmarks/fp8_check.py"""
import torch
import torch.nn.functional as F

from dreambooth_pl import fp8_gemm
from dreambooth_pl.fp8_quant_kernel import quantize_rows

dev = torch.device("cuda")
torch.manual_seed(0)
x = torch.randn(4096, 5120, device=dev, dtype=torch.float16) * 3
q, s = quantize_rows(x)
qr, sr = fp8_gemm.quantize_rows_reference(x)
d = (q.view(torch.uint8).int() - qr.view(torch.uint8).int()).abs()
print(f"triton codes != reference: {int((d > 0).sum())} of {d.numel()} (max {int(d.max())} code), "
      f"scales equal: {torch.equal(s, sr)}")
print("out dtype for fp16:", fp8_gemm._out_dtype(dev, torch.float16))


def ms(fn, n=20):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


tot = {"fp16": 0.0, "fp8 gemm": 0.0, "fp8 + quantize": 0.0}
for m, k, n, count in [(16 * 1024, 1280, 1280, 60 * 6 + 12), (16 * 1024, 1280, 10240, 60), (16 * 1024, 5120, 1280, 60),
                       (16 * 4096, 640, 640, 10 * 6 + 10), (16 * 4096, 640, 5120, 10), (16 * 4096, 2560, 640, 10)]:
    lin = torch.nn.Linear(k, n, device=dev, dtype=torch.float16).requires_grad_(False)
    f8 = fp8_gemm.Fp8Linear(lin)
    xin = torch.randn(m, k, device=dev, dtype=torch.float16)
    qx, sx = quantize_rows(xin)
    t16 = ms(lambda: F.linear(xin, lin.weight, lin.bias))
    t8 = ms(lambda: fp8_gemm.scaled_linear(qx, sx, f8.qweight, f8.wscale, lin.bias, torch.float16))
    tq = ms(lambda: f8.shared.clear() or f8(xin))
    ref = F.linear(xin.float(), lin.weight.float(), lin.bias.float())
    err = ((f8(xin).float() - ref).norm() / ref.norm()).item()
    err16 = ((F.linear(xin, lin.weight, lin.bias).float() - ref).norm() / ref.norm()).item()
    print(f"[{m},{k}]x[{k},{n}] x{count}: fp16 {t16:.3f} ms ({2*m*k*n/t16/1e9:.0f} TFLOP/s), fp8 gemm {t8:.3f} "
          f"({2*m*k*n/t8/1e9:.0f}), fp8 + quantize {tq:.3f}; rel err fp8 {err:.2e}, fp16 {err16:.2e}")
    for key, t in zip(tot, (t16, t8, tq)):
        tot[key] += t * count
print("one guided batch-forward's transformer linears (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in tot.items()))

# fp8_block.py's producers: what the fused kernels save per guided batch-forward (norm1, norm2 + add, norm3 + add
# and the GEGLU per block; 60 blocks at 1280 over 16 x 1024 tokens, 10 at 640 over 16 x 4096)
from dreambooth_pl import fp8_quant_kernel, geglu_kernel  # noqa: E402

prod = {"unfused": 0.0, "fused": 0.0}
for m, k, blocks in [(16 * 1024, 1280, 60), (16 * 4096, 640, 10)]:
    norm = torch.nn.LayerNorm(k, device=dev, dtype=torch.float16)
    xin, res = (torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(2))
    a, g = (torch.randn(m, 4 * k, device=dev, dtype=torch.float16) for _ in range(2))
    w, b, eps = norm.weight, norm.bias, norm.eps
    steps = {  # (unfused, fused, calls per block)
        "norm": (lambda: quantize_rows(norm(xin)), lambda: fp8_quant_kernel.layer_norm_rows(xin, None, w, b, eps), 1),
        "add + norm": (lambda: quantize_rows(norm(xin + res)),
                       lambda: fp8_quant_kernel.layer_norm_rows(xin, res, w, b, eps), 2),
        "geglu": (lambda: quantize_rows(geglu_kernel.forward(a, g)),
                  lambda: fp8_quant_kernel.gated_gelu_rows(a, g), 1)}
    for name, (unfused, fused, calls) in steps.items():
        tu, tf = ms(unfused), ms(fused)
        print(f"[{m},{k}] {name}: unfused {tu:.3f} ms, fused {tf:.3f} ms")
        prod["unfused"] += tu * calls * blocks
        prod["fused"] += tf * calls * blocks
_, qf, sf = fp8_quant_kernel.layer_norm_rows(xin, res, w, b, eps)
qr, sr = fp8_gemm.quantize_rows_reference(norm(xin + res))
d = (qf.view(torch.uint8).int() - qr.view(torch.uint8).int()).abs()
print(f"fused add + norm codes != unfused: {int((d > 0).sum())} of {d.numel()} (max {int(d.max())} code)")
print("one guided batch-forward's norms and GEGLUs with their quantization (ms): "
      + ", ".join(f"{k} {v:.1f}" for k, v in prod.items()))
