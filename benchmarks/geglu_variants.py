"""GEGLU forward + backward on SDXL's two feed-forward shapes, four ways (diagnostic, GPU only).

    python benchmarks/geglu_variants.py

diffusers' eager ``GEGLU`` (one projection, ``chunk``: strided halves); the same compiled; the projection as two
GEMMs on the weight's row blocks with the activation eager; and the same with the activation compiled
(``block_ops.fuse_geglu``, ``perf.fused_blocks``). bf16 autocast, frozen bf16 weights, gradient to the input only,
as in the LoRA step. Prints milliseconds per forward + backward, from CUDA events over 20 repeats.
"""
from __future__ import annotations

import types

import torch
from diffusers.models.activations import GEGLU

from dreambooth_pl import block_ops


def time_ms(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int = 20) -> float:
    def step():
        xg = x.detach().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(xg)
        out.backward(grad)

    for _ in range(3):  # compile and cuBLAS plans outside the timing
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    torch.manual_seed(0)
    for tokens, dim in ((2 * 1024, 1280), (2 * 4096, 640)):  # the 32x32 and 64x64 levels at 1024², batch 2
        x = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(1, tokens, 4 * dim, device="cuda", dtype=torch.bfloat16)
        rows, strided = {}, torch.compile(block_ops.geglu, dynamic=False)
        for name in ("diffusers eager", "diffusers compiled", "split GEMMs, eager gelu", "split GEMMs, compiled"):
            m = GEGLU(dim, 4 * dim).to("cuda", torch.bfloat16).requires_grad_(False)
            if name == "diffusers compiled":
                m.forward = types.MethodType(lambda self, h: strided(self.proj(h)), m)
            elif name.startswith("split"):
                block_ops.fuse_geglu(torch.nn.Sequential(m))
                if "eager" in name:
                    m.forward = types.MethodType(lambda self, h: block_ops.gated_gelu(*(
                        torch.nn.functional.linear(h, w, b) for w, b in zip(self.proj.weight.chunk(2),
                                                                           self.proj.bias.chunk(2)))), m)
            rows[name] = time_ms(m, x, grad)
        print(f"tokens {tokens}, width {dim} -> 2 x {4 * dim}: " +
              ", ".join(f"{k} {v:.3f} ms" for k, v in rows.items()))


if __name__ == "__main__":
    main()
