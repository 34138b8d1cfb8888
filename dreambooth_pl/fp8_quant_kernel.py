"""A matrix's rows as float8 e4m3 codes and fp32 scales in one pass (fp8_gemm.py's input quantization), in Triton,
alone or as the last step of the op that produces the rows (fp8_block.py).

Eagerly the same takes a max reduction, an fp32 copy, a division and a cast: ~11 bytes moved per element, against
3 here (half-precision in, one code byte out), which is what keeps the float8 GEMM's saving (fp8_gemm.py). Where
the rows come from a LayerNorm (after a residual add) or a GEGLU, the producer's kernel quantizes them itself: its
half-precision output is never written nor read again (4 to 6 bytes less per element, fp8_block.py). One program per
row: SDXL's rows are 320 to 5120 wide, so a whole row sits in registers. Every kernel rounds the row to the
half-precision dtype first, as the unfused ops' output would be, so the codes are theirs (the LayerNorm's
statistics but for their last bit). ``TRITON_INTERPRET=1``
(set before this module is first imported) runs them on the CPU for the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .geglu_kernel import _SQRT1_2  # gelu(g) = g · Φ(g), Φ(g) = (1 + erf(g / √2)) / 2
from .triton_launch import launch as _run

FP8_MAX = tl.constexpr(448.0)
TINY = tl.constexpr(1e-12)


# tl.max is itself a jit function, which the tests' interpreter (loaded after Triton) cannot call: tl.reduce with
# its combine function is what it compiles to (as group_norm_kernel.py's _sum)
@triton.jit
def _amax(x):
    return tl.reduce(tl.abs(x), 0, tl.standard._elementwise_max)


@triton.jit
def _sum(x):
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _row(k, BLOCK_K: tl.constexpr):
    """This program's row, its columns and their mask (one program per row)."""
    cols = tl.arange(0, BLOCK_K)
    return tl.program_id(0).to(tl.int64), cols, cols < k


@triton.jit
def _load(ptr, row, stride, cols, mask):
    """Row ``row`` of a matrix of row stride ``stride`` in fp32 (zero where masked)."""
    return tl.load(ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_codes(y, q_ptr, s_ptr, row, cols, k, mask):
    """Row ``row``'s codes and scale from its fp32 values ``y`` (zero where masked)."""
    scale = tl.fdiv(tl.maximum(_amax(y), TINY), FP8_MAX, ieee_rounding=True)
    # IEEE division (div.rn), as PyTorch divides: a code at a rounding boundary comes out as the reference's
    q = tl.minimum(tl.maximum(tl.fdiv(y, scale, ieee_rounding=True), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * k + cols, q.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, k, stride, BLOCK_K: tl.constexpr):
    row, cols, mask = _row(k, BLOCK_K)
    _store_codes(_load(x_ptr, row, stride, cols, mask), q_ptr, s_ptr, row, cols, k, mask)


@triton.jit
def _layer_norm_rows_kernel(x_ptr, r_ptr, h_ptr, w_ptr, b_ptr, q_ptr, s_ptr, k, eps, HAS_RESIDUAL: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    # h = x + r (stored: the block's residual stream), then LayerNorm(h) as codes; mean and variance in fp32 (two
    # passes over the row in registers, where PyTorch's kernel runs Welford: the statistics may differ in the last
    # bit, and a code at a rounding boundary with them, ~1e-4 of codes)
    row, cols, mask = _row(k, BLOCK_K)
    x = _load(x_ptr, row, k, cols, mask)
    if HAS_RESIDUAL:
        # the half-precision sum the eager add writes
        h = (x + _load(r_ptr, row, k, cols, mask)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * k + cols, h, mask=mask)
        x = h.to(tl.float32)
    mean = _sum(x) / k
    d = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(_sum(d * d) / k + eps)  # (PyTorch's kernel takes rsqrtf too)
    y = d * rstd * _load(w_ptr, 0, 0, cols, mask) + _load(b_ptr, 0, 0, cols, mask)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the norm's half-precision output
    _store_codes(tl.where(mask, y, 0.0), q_ptr, s_ptr, row, cols, k, mask)


@triton.jit
def _gated_gelu_rows_kernel(a_ptr, g_ptr, q_ptr, s_ptr, k, BLOCK_K: tl.constexpr):
    row, cols, mask = _row(k, BLOCK_K)
    a, g = _load(a_ptr, row, k, cols, mask), _load(g_ptr, row, k, cols, mask)
    y = (a * (0.5 * g * (1.0 + tl.erf(g * _SQRT1_2)))).to(a_ptr.dtype.element_ty).to(tl.float32)
    _store_codes(y, q_ptr, s_ptr, row, cols, k, mask)


def _codes(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((m, k), device=device, dtype=torch.float8_e4m3fn),
            torch.empty((m, 1), device=device, dtype=torch.float32))


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [M, K] float8_e4m3fn, s [M, 1] float32)`` of a 2-D ``x`` whose rows are contiguous, ``x ≈ s · q``
    (fp8_gemm.quantize_rows_reference's values)."""
    m, k = x.shape
    q, s = _codes(m, k, x.device)
    if m:
        block = triton.next_power_of_2(k)
        _run(_quantize_rows_kernel, (m,), x, q, s, k, x.stride(0), BLOCK_K=block, num_warps=_warps(block))
    return q, s


def layer_norm_rows(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(h, q, s)``: ``h = x + residual`` (None without one) and ``LayerNorm(h)``'s rows as codes ``q [M, K]`` and
    scales ``s [M, 1]``, for contiguous 2-D ``x`` and ``residual`` of one half-precision dtype and an affine norm
    over ``K``."""
    m, k = x.shape
    q, s = _codes(m, k, x.device)
    h = torch.empty_like(x) if residual is not None else None
    if m:
        block = triton.next_power_of_2(k)
        _run(_layer_norm_rows_kernel, (m,), x, x if residual is None else residual, x if h is None else h, weight,
             bias, q, s, k, eps, HAS_RESIDUAL=residual is not None, BLOCK_K=block, num_warps=_warps(block))
    return h, q, s


def gated_gelu_rows(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a · gelu(g)``'s rows (geglu_kernel.py's value, rounded to ``a``'s dtype) as codes and scales, for
    contiguous 2-D ``a`` and ``g`` of one shape and dtype."""
    m, k = a.shape
    q, s = _codes(m, k, a.device)
    if m:
        block = triton.next_power_of_2(k)
        _run(_gated_gelu_rows_kernel, (m,), a, g, q, s, k, BLOCK_K=block, num_warps=_warps(block))
    return q, s
