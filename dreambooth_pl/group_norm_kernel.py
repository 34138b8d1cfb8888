"""GroupNorm (Wu & He 2018) over NCHW or NHWC (channels_last) tensors as three Triton kernels, with the resnet's
``+ temb`` before it and the SiLU after it fused in, forward and backward (frozen affine parameters).

Why: PyTorch's CUDA GroupNorm makes a channels_last input contiguous (a copy in, an NCHW tensor out), so an NHWC
UNet pays a layout copy around every norm and cuDNN converts back before every convolution (BENCHMARKS.md
2026-12-06, channels_last profile: 189 ms of copies in 1.56 s). In NCHW the norm's statistics and its normalising
pass are two kernels, the SiLU a third pass and the resnet's ``h + temb`` a fourth, broadcast and not vectorised.
Here the input's layout is read through its strides and kept for the output, and the add, the norm and the SiLU
read the tensor twice and write it once.

- ``_partial_stats``: one program per (image, block of pixels, block of channels) reduces its tile over pixels to
  each channel's mean and sum of squared deviations (exact within the tile: two passes over registers).
- ``_group_stats``: one program per (image, group) merges its channels' partials (Chan et al. 1979's pairwise
  update: ``M2 = sum M2_i + n_i (mean_i - mean)^2``) to the group's mean and 1/std, in fp32.
- ``_apply``: the same tiles again, normalised, scaled, shifted and optionally SiLU'd, rounded once.
- Backward: ``_grad_partial`` sums, per tile and channel, the gradient g reaching x̂ and g·x̂ (the norm's output
  recomputed from the saved input and statistics, not stored); torch sums them per group; ``_grad_apply`` writes
  ``dx`` in the input's layout and, where the add needs one, its per-channel gradient.

``TRITON_INTERPRET=1`` (set before this module is first imported) runs the kernels on CPU tensors for the tests.
Meta tensors build the kernels without running them (kernel_warmup.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .triton_launch import launch as _run  # (a meta tensor builds instead of launching)

BLOCK_P, BLOCK_C = 64, 64  # a tile: 64 pixels x 64 channels (4096 values; 32 per thread at 4 warps)


# tl.sum is itself a jit function, which the tests' interpreter (loaded after Triton) cannot call; tl.reduce with
# its combine function is what tl.sum compiles to, and the interpreter runs that one as one numpy sum
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _partial_stats(x_ptr, add_ptr, mean_ptr, m2_ptr, P, C, NPB, sxn, sxc, sxp, san, sac,
                   HAS_ADD: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pb, n, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pb * BP + tl.arange(0, BP)
    c = cb * BC + tl.arange(0, BC)
    pm, cm = p < P, c < C
    mask = pm[:, None] & cm[None, :]
    base = n.to(tl.int64) * sxn
    x = tl.load(x_ptr + base + p[:, None].to(tl.int64) * sxp + c[None, :].to(tl.int64) * sxc, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_ADD:  # (the padding stays zero: the tile's sum counts real pixels only)
        x = tl.where(mask, x + tl.load(add_ptr + n * san + c * sac, mask=cm, other=0.0).to(tl.float32)[None, :], 0.0)
    cnt = tl.minimum(P - pb * BP, BP).to(tl.float32)
    mean = _sum(x, axis=0) / cnt
    d = tl.where(mask, x - mean[None, :], 0.0)
    out = (n * NPB + pb).to(tl.int64) * C + c
    tl.store(mean_ptr + out, mean, mask=cm)
    tl.store(m2_ptr + out, _sum(d * d, axis=0), mask=cm)


@triton.jit
def _group_stats(mean_ptr, m2_ptr, gmean_ptr, rstd_ptr, P, C, NPB, G, CPG, total, eps,
                 BPB: tl.constexpr, BG: tl.constexpr, BP: tl.constexpr):
    n, g = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BG)
    c = g * CPG + j
    cm = j < CPG
    row0 = n.to(tl.int64) * NPB
    acc = tl.full((BPB, BG), 0.0, tl.float32)
    for start in range(0, NPB, BPB):  # the group's mean: the partial means weighted by their pixel counts
        pb = start + tl.arange(0, BPB)
        m = (pb < NPB)[:, None] & cm[None, :]
        cnt = tl.minimum(P - pb * BP, BP).to(tl.float32)
        part = tl.load(mean_ptr + (row0 + pb[:, None]) * C + c[None, :], mask=m, other=0.0)
        acc += tl.where(m, part * cnt[:, None], 0.0)
    mean = _sum(_sum(acc, axis=1), axis=0) / total
    acc = tl.full((BPB, BG), 0.0, tl.float32)
    for start in range(0, NPB, BPB):  # Chan's merge: each partial's M2 plus its count times its mean's offset^2
        pb = start + tl.arange(0, BPB)
        m = (pb < NPB)[:, None] & cm[None, :]
        cnt = tl.minimum(P - pb * BP, BP).to(tl.float32)
        off = (row0 + pb[:, None]) * C + c[None, :]
        dm = tl.load(mean_ptr + off, mask=m, other=0.0) - mean
        acc += tl.where(m, tl.load(m2_ptr + off, mask=m, other=0.0) + cnt[:, None] * dm * dm, 0.0)
    var = _sum(_sum(acc, axis=1), axis=0) / total
    tl.store(gmean_ptr + n * G + g, mean)
    tl.store(rstd_ptr + n * G + g, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply(x_ptr, add_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, y_ptr, P, C, G, CPG, sxn, sxc, sxp, san, sac,
           syn, syc, syp, HAS_ADD: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr,
           BP: tl.constexpr, BC: tl.constexpr):
    pb, n, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pb * BP + tl.arange(0, BP)
    c = cb * BC + tl.arange(0, BC)
    pm, cm = p < P, c < C
    mask = pm[:, None] & cm[None, :]
    x = tl.load(x_ptr + n.to(tl.int64) * sxn + p[:, None].to(tl.int64) * sxp + c[None, :].to(tl.int64) * sxc,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + n * san + c * sac, mask=cm, other=0.0).to(tl.float32)[None, :]
    grp = n * G + c // CPG
    scale = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
    shift = -tl.load(gmean_ptr + grp, mask=cm, other=0.0) * scale
    if AFFINE:
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        scale, shift = scale * w, shift * w + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    y = x * scale[None, :] + shift[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + n.to(tl.int64) * syn + p[:, None].to(tl.int64) * syp + c[None, :].to(tl.int64) * syc,
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, n, p, c, mask, cm, G, CPG, sxn, sxc, sxp,
               san, sac, sdn, sdc, sdp, HAS_ADD: tl.constexpr, AFFINE: tl.constexpr, SILU: tl.constexpr):
    # a tile's normalised input x̂, its 1/std, and the gradient reaching x̂ (through the SiLU and the scale)
    x = tl.load(x_ptr + n.to(tl.int64) * sxn + p[:, None].to(tl.int64) * sxp + c[None, :].to(tl.int64) * sxc,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + n * san + c * sac, mask=cm, other=0.0).to(tl.float32)[None, :]
    grp = n * G + c // CPG
    rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
    xhat = (x - tl.load(gmean_ptr + grp, mask=cm, other=0.0)[None, :]) * rstd[None, :]
    g = tl.load(dy_ptr + n.to(tl.int64) * sdn + p[:, None].to(tl.int64) * sdp + c[None, :].to(tl.int64) * sdc,
                mask=mask, other=0.0).to(tl.float32)
    if AFFINE:
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if SILU:  # silu'(z) = s (1 + z (1 - s)), s = sigmoid(z), z the norm's output
        z = xhat
        if AFFINE:
            z = xhat * w[None, :] + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = g * sig * (1.0 + z * (1.0 - sig))
    if AFFINE:
        g = g * w[None, :]
    return tl.where(mask, xhat, 0.0), rstd, tl.where(mask, g, 0.0)


@triton.jit
def _grad_partial(dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, s1_ptr, s2_ptr, P, C, G, CPG, NPB,
                  sxn, sxc, sxp, san, sac, sdn, sdc, sdp, HAS_ADD: tl.constexpr, AFFINE: tl.constexpr,
                  SILU: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pb, n, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pb * BP + tl.arange(0, BP)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    mask = (p < P)[:, None] & cm[None, :]
    xhat, rstd, g = _grad_tile(dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, n, p, c, mask, cm, G, CPG,
                               sxn, sxc, sxp, san, sac, sdn, sdc, sdp, HAS_ADD, AFFINE, SILU)
    out = (n * NPB + pb).to(tl.int64) * C + c
    tl.store(s1_ptr + out, _sum(g, 0), mask=cm)
    tl.store(s2_ptr + out, _sum(g * xhat, 0), mask=cm)


@triton.jit
def _grad_apply(dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, c1_ptr, c2_ptr, dx_ptr, da_ptr, P, C, G,
                CPG, NPB, sxn, sxc, sxp, san, sac, sdn, sdc, sdp, son, soc, sop, HAS_ADD: tl.constexpr,
                AFFINE: tl.constexpr, SILU: tl.constexpr, ADD_GRAD: tl.constexpr, BP: tl.constexpr,
                BC: tl.constexpr):
    pb, n, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pb * BP + tl.arange(0, BP)
    c = cb * BC + tl.arange(0, BC)
    cm = c < C
    mask = (p < P)[:, None] & cm[None, :]
    xhat, rstd, g = _grad_tile(dy_ptr, x_ptr, add_ptr, w_ptr, b_ptr, gmean_ptr, rstd_ptr, n, p, c, mask, cm, G, CPG,
                               sxn, sxc, sxp, san, sac, sdn, sdc, sdp, HAS_ADD, AFFINE, SILU)
    grp = n * G + c // CPG
    c1 = tl.load(c1_ptr + grp, mask=cm, other=0.0)
    c2 = tl.load(c2_ptr + grp, mask=cm, other=0.0)
    dx = tl.where(mask, rstd[None, :] * (g - c1[None, :] - xhat * c2[None, :]), 0.0)
    tl.store(dx_ptr + n.to(tl.int64) * son + p[:, None].to(tl.int64) * sop + c[None, :].to(tl.int64) * soc,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if ADD_GRAD:  # the add's gradient: dx summed over the tile's pixels, per channel (the blocks summed after)
        tl.store(da_ptr + (n * NPB + pb).to(tl.int64) * C + c, _sum(dx, 0), mask=cm)


def flat_strides(x: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``x``'s (image, channel, pixel) strides where its spatial dims flatten to one pixel index (NCHW, NHWC, or a
    3-D ``[N, C, L]``); None where they do not."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.stride(2)
    if x.dim() != 4:
        return None
    sn, sc, sh, sw = x.stride()
    if x.shape[2] > 1 and x.shape[3] > 1 and sh != sw * x.shape[3]:
        return None
    return sn, sc, (sw if x.shape[3] > 1 else sh)


class _Launch(NamedTuple):
    """What every kernel of one call reads: strides, sizes, the add (or a placeholder), the affine and the grid."""
    strides: tuple
    n: int
    c: int
    p: int
    npb: int
    cpg: int
    add: torch.Tensor
    add_strides: tuple
    w: torch.Tensor
    b: torch.Tensor
    tiles: tuple


def _launch(x: torch.Tensor, add: Optional[torch.Tensor], groups: int, weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor]) -> _Launch:
    strides = flat_strides(x)
    if strides is None:
        raise ValueError(f"group_norm: spatial dims of a tensor with strides {x.stride()} do not flatten")
    n, c = x.shape[0], x.shape[1]
    if c % groups:
        raise ValueError(f"group_norm: {c} channels do not split into {groups} groups")
    p = x[0, 0].numel() if n and c else 0
    npb = triton.cdiv(p, BLOCK_P)
    a = add.reshape(n, c) if add is not None else x  # placeholder pointers where there is no add or affine
    w = weight if weight is not None else x
    b = bias if bias is not None else (torch.zeros_like(weight) if weight is not None else x)
    return _Launch(strides, n, c, p, npb, c // groups, a, (a.stride(0), a.stride(1)) if add is not None else (0, 0),
                   w, b, (npb, n, triton.cdiv(c, BLOCK_C)))  # pixel blocks on axis 0: axes 1 and 2 stop at 65,535


def forward(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
            add: Optional[torch.Tensor] = None, silu: bool = False):
    """:func:`group_norm`'s output and each (image, group)'s fp32 mean and 1/std ``[N, groups]``."""
    k = _launch(x, add, groups, weight, bias)
    y = torch.empty_like(x)
    gmean = torch.empty(k.n, groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(gmean)
    if not x.numel():
        return y, gmean, rstd
    mean = torch.empty(k.n, k.npb, k.c, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _run(_partial_stats, k.tiles, x, k.add, mean, m2, k.p, k.c, k.npb, *k.strides, *k.add_strides,
         HAS_ADD=add is not None, BP=BLOCK_P, BC=BLOCK_C)
    # the element count as a float: Triton turns an int argument equal to 1 (a 1x1 map) into a constant. The tile
    # is fixed but for the widest groups: each constexpr set is one more Triton build on a fresh machine (SDXL's 10
    # to 80 channels per group and 1 to 256 pixel blocks would be eight of them)
    _run(_group_stats, (k.n, groups), mean, m2, gmean, rstd, k.p, k.c, k.npb, groups, k.cpg, float(k.p * k.cpg),
         float(eps), BPB=16, BG=max(64, triton.next_power_of_2(k.cpg)), BP=BLOCK_P)
    _run(_apply, k.tiles, x, k.add, k.w, k.b, gmean, rstd, y, k.p, k.c, groups, k.cpg, *k.strides, *k.add_strides,
         *flat_strides(y), HAS_ADD=add is not None, AFFINE=weight is not None, SILU=silu, BP=BLOCK_P, BC=BLOCK_C)
    return y, gmean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, groups: int, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], add: Optional[torch.Tensor], silu: bool, gmean: torch.Tensor,
             rstd: torch.Tensor, add_grad: bool = False):
    """The gradients of :func:`forward` with respect to ``x`` (in ``x``'s layout) and, with ``add_grad``, ``add``
    (``[N, C]``, fp32), from ``dy`` in any flattenable layout: with x̂ the normalised input and g the gradient
    reaching it, ``dx = (g - mean_group(g) - x̂ · mean_group(g · x̂)) / std`` (Wu & He 2018's norm, differentiated)."""
    k = _launch(x, add, groups, weight, bias)
    dys = flat_strides(dy)
    if dys is None:
        dy = dy.contiguous()
        dys = flat_strides(dy)
    dx = torch.empty_like(x)
    if not x.numel():
        return dx, (torch.zeros(k.n, k.c, device=x.device) if add_grad else None)
    s1 = torch.empty(k.n, k.npb, k.c, device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    flags = dict(HAS_ADD=add is not None, AFFINE=weight is not None, SILU=silu, BP=BLOCK_P, BC=BLOCK_C)
    common = (dy, x, k.add, k.w, k.b, gmean, rstd)
    _run(_grad_partial, k.tiles, *common, s1, s2, k.p, k.c, groups, k.cpg, k.npb, *k.strides, *k.add_strides,
         *dys, **flags)
    count = float(k.cpg * k.p)  # the per-group means of g and g·x̂: small [N, NPB, C] partials, summed by torch
    c1 = (s1.view(k.n, k.npb, groups, k.cpg).sum((1, 3)) / count).contiguous()
    c2 = (s2.view(k.n, k.npb, groups, k.cpg).sum((1, 3)) / count).contiguous()
    da = s1 if add_grad else None  # (its memory reused: s1 is read above and no more)
    _run(_grad_apply, k.tiles, *common, c1, c2, dx, s1, k.p, k.c, groups, k.cpg, k.npb, *k.strides,
         *k.add_strides, *dys, *flat_strides(dx), ADD_GRAD=add_grad, **flags)
    return dx, (da.sum(1) if add_grad else None)


class FusedGroupNorm(torch.autograd.Function):
    """:func:`forward` with :func:`backward` as its gradient (the affine parameters get none: frozen norms only).
    Saves the input, the add and the statistics; the norm's output is recomputed in the backward."""

    @staticmethod
    def forward(ctx, x, add, weight, bias, groups: int, eps: float, silu: bool):
        y, gmean, rstd = forward(x, groups, weight, bias, eps, add, silu)
        ctx.save_for_backward(x, add, weight, bias, gmean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, add, weight, bias, gmean, rstd = ctx.saved_tensors
        dx, da = backward(dy, x, ctx.groups, weight, bias, add, ctx.silu, gmean, rstd,
                          add_grad=ctx.needs_input_grad[1])
        da = da.to(add.dtype).reshape(add.shape) if da is not None else None
        return dx, da, None, None, None, None, None


def group_norm(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, add: Optional[torch.Tensor] = None, silu: bool = False) -> torch.Tensor:
    """``silu?(group_norm(x + add))`` in ``x``'s dtype and memory format; differentiable in ``x`` and ``add``
    where autograd records (the affine parameters must not need a gradient).

    Args:
        x: ``[N, C, H, W]`` or ``[N, C, L]``, any layout whose spatial dims flatten (:func:`flat_strides`).
        groups: groups of channels (C divisible by it).
        weight, bias: the per-channel affine ``[C]``, or both None.
        eps: added to the variance.
        add: ``[N, C]`` or ``[N, C, 1, 1]``, added per image and channel before the norm (the resnet's ``temb``).
        silu: apply ``y * sigmoid(y)`` after.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (add is not None and add.requires_grad)):
        return FusedGroupNorm.apply(x, add, weight, bias, groups, eps, silu)
    return forward(x, groups, weight, bias, eps, add, silu)[0]
