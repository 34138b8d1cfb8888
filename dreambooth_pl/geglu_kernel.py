"""``a · gelu(g)`` (GEGLU's activation, Shazeer 2020) and its gradients as two hand-written Triton kernels.

Why not ``torch.compile`` of the formula (what block_ops did before): on a fresh machine its first call imports
Dynamo and Inductor, traces, autotunes and compiles each shape and grad mode apart, seconds that land in the prior
sampler's first batch and again in training's first step (the user's whole run, BENCHMARKS.md 2026-12-06). These
kernels are shape-generic: one compile per dtype serves every batch, bucket and grad mode, and Triton keeps it on
disk. Both compute in fp32 and round once, as Inductor's kernel did; gelu is the exact (erf) form diffusers uses.

The kernels run on CUDA tensors; ``TRITON_INTERPRET=1`` (set before this module is first imported) runs them on
the CPU for the tests; meta tensors build them without running them (kernel_warmup.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import launch as _run  # (a meta tensor builds instead of launching)

BLOCK = 1024  # elements per program: 8 half-precision values per thread at 4 warps, 16-byte vector accesses
# a kernel reads a module global only as a constexpr instance (Triton refuses plain floats there)
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2): gelu(g) = g * Phi(g), Phi(g) = (1 + erf(g / sqrt 2)) / 2
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # the standard normal density's constant, for Phi'(g)


@triton.jit
def _forward_kernel(a_ptr, g_ptr, out_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = a * (0.5 * g * (1.0 + tl.erf(g * _SQRT1_2)))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, a_ptr, g_ptr, da_ptr, dg_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * _SQRT1_2))
    pdf = tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    tl.store(da_ptr + offs, (grad * g * cdf).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (grad * a * (cdf + g * pdf)).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def forward(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a · gelu(g)`` of two contiguous tensors of one shape and dtype (no autograd)."""
    out = torch.empty_like(a)
    n = a.numel()
    if n:
        _run(_forward_kernel, _grid(n), a, g, out, n, BLOCK_SIZE=BLOCK)
    return out


def backward(grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`forward` with respect to ``a`` and ``g``, in one pass."""
    grad = grad.contiguous()
    da, dg = torch.empty_like(a), torch.empty_like(g)
    n = a.numel()
    if n:
        _run(_backward_kernel, _grid(n), grad, a, g, da, dg, n, BLOCK_SIZE=BLOCK)
    return da, dg


class GatedGelu(torch.autograd.Function):
    """:func:`forward` with :func:`backward` as its gradient; saves the two inputs, as the compiled kernel did."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, g)
        return forward(a, g)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, g = ctx.saved_tensors
        return backward(grad, a, g)


def gated_gelu(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a · gelu(g)``, differentiable where autograd records and either input needs a gradient."""
    if torch.is_grad_enabled() and (a.requires_grad or g.requires_grad):
        return GatedGelu.apply(a, g)
    return forward(a, g)
