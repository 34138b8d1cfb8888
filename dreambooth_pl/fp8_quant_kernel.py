"""A matrix's rows as float8 e4m3 codes and fp32 scales in one pass (fp8_gemm.py's input quantization), in Triton.

Eagerly the same takes a max reduction, an fp32 copy, a division and a cast: ~11 bytes moved per element, against
3 here (half-precision in, one code byte out), which is what keeps the float8 GEMM's saving (fp8_gemm.py). One
program per row: SDXL's rows are 320 to 5120 wide, so a whole row sits in registers. ``TRITON_INTERPRET=1`` (set
before this module is first imported) runs it on the CPU for the tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import launch as _run

FP8_MAX = tl.constexpr(448.0)
TINY = tl.constexpr(1e-12)


# tl.max is itself a jit function, which the tests' interpreter (loaded after Triton) cannot call: tl.reduce with
# its combine function is what it compiles to (as group_norm_kernel.py's _sum)
@triton.jit
def _amax(x):
    return tl.reduce(tl.abs(x), 0, tl.standard._elementwise_max)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, k, stride, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < k
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.fdiv(tl.maximum(_amax(x), TINY), FP8_MAX, ieee_rounding=True)
    # IEEE division (div.rn), as PyTorch divides: a code at a rounding boundary comes out as the reference's
    q = tl.minimum(tl.maximum(tl.fdiv(x, scale, ieee_rounding=True), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * k + cols, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K] float8_e4m3fn, s [M, 1] float32)`` of a 2-D ``x`` whose rows are contiguous, ``x ≈ s · q``
    (fp8_gemm.quantize_rows_reference's values)."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m:
        block = triton.next_power_of_2(k)
        _run(_quantize_rows_kernel, (m,), x, q, s, k, x.stride(0), BLOCK_K=block,
             num_warps=8 if block >= 4096 else 4)
    return q, s
