"""GroupNorm (Wu & He 2018) over NCHW or NHWC (channels_last) tensors as three Triton kernels, with the resnet's
``+ temb`` before it and the SiLU after it fused in (inference only: no autograd).

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

``TRITON_INTERPRET=1`` (set before this module is first imported) runs the kernels on CPU tensors for the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_P, BLOCK_C = 64, 64  # a tile: 64 pixels x 64 channels (4096 values; 32 per thread at 4 warps)


# tl.sum is itself a jit function, which the tests' interpreter (loaded after Triton) cannot call; tl.reduce with
# its combine function is what tl.sum compiles to, and the interpreter runs that one as one numpy sum
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _partial_stats(x_ptr, add_ptr, mean_ptr, m2_ptr, P, C, NPB, sxn, sxc, sxp, san, sac,
                   HAS_ADD: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
def _group_stats(mean_ptr, m2_ptr, gmean_ptr, rstd_ptr, P, C, NPB, G, CPG, eps,
                 BPB: tl.constexpr, BG: tl.constexpr, BP: tl.constexpr):
    n, g = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, BG)
    c = g * CPG + j
    cm = j < CPG
    total = P.to(tl.float32) * CPG
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
    n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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


def group_norm(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, add: Optional[torch.Tensor] = None, silu: bool = False) -> torch.Tensor:
    """``silu?(group_norm(x + add))`` in ``x``'s dtype and memory format (no autograd).

    Args:
        x: ``[N, C, H, W]`` or ``[N, C, L]``, any layout whose spatial dims flatten (:func:`flat_strides`).
        groups: groups of channels (C divisible by it).
        weight, bias: the per-channel affine ``[C]``, or both None.
        eps: added to the variance.
        add: ``[N, C]`` or ``[N, C, 1, 1]``, added per image and channel before the norm (the resnet's ``temb``).
        silu: apply ``y * sigmoid(y)`` after.
    """
    strides = flat_strides(x)
    if strides is None:
        raise ValueError(f"group_norm: spatial dims of a tensor with strides {x.stride()} do not flatten")
    n, c = x.shape[0], x.shape[1]
    p = x[0, 0].numel() if n and c else 0
    y = torch.empty_like(x)
    if not x.numel():
        return y
    cpg = c // groups
    npb = triton.cdiv(p, BLOCK_P)
    a = add.reshape(n, c) if add is not None else x  # (a placeholder pointer where there is none)
    sa = (a.stride(0), a.stride(1)) if add is not None else (0, 0)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    mean = torch.empty(n, npb, c, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    gmean = torch.empty(n, groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(gmean)
    tiles = (n, npb, triton.cdiv(c, BLOCK_C))
    _partial_stats[tiles](x, a, mean, m2, p, c, npb, *strides, *sa, HAS_ADD=add is not None, BP=BLOCK_P,
                          BC=BLOCK_C)
    _group_stats[(n, groups)](mean, m2, gmean, rstd, p, c, npb, groups, cpg, float(eps),
                              BPB=min(64, triton.next_power_of_2(npb)), BG=triton.next_power_of_2(cpg), BP=BLOCK_P)
    ys = flat_strides(y)
    _apply[tiles](x, a, w, b, gmean, rstd, y, p, c, groups, cpg, *strides, *sa, *ys, HAS_ADD=add is not None,
                  AFFINE=weight is not None, SILU=silu, BP=BLOCK_P, BC=BLOCK_C)
    return y
