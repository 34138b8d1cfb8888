"""The float8 draw's transformer blocks, whose LayerNorms and GEGLU write the float8 codes their GEMMs read.

With ``fp8_gemms`` (fp8_gemm.py) every linear of a ``BasicTransformerBlock`` reads float8 codes, and most read a
LayerNorm's output (self-attention's q, k, v read norm1's; cross-attention's q norm2's; the feed-forward norm3's) or
the GEGLU's (the feed-forward's output projection). Unfused, each of those ops writes its half-precision output,
which a quantization pass reads back (fp8_quant_kernel.py). Here the producing kernel writes the codes itself, and the
norms after the two attentions take the attention's residual add in the same pass: per element of a block's width
(x4 for the GEGLU's), the block's non-GEMM memory traffic falls from about 81 bytes to 49 (half-precision reads and
writes of each pass counted; BENCHMARKS.md has what the draw gains). The codes are the unfused path's: each kernel
rounds its values to half precision before quantizing, as the unfused op's output is rounded (on a GPU the
LayerNorm's statistics may differ from PyTorch's in their last bit, moving ~1e-4 of the codes a step).

:func:`fuse` gives each qualifying block of a UNet this forward. Anything outside the draw's plain case (masks,
``cross_attention_kwargs``, gradients, a compiled region, layers that are no longer float8, processors other than
plain_attention.py's, alone or inside zero_negative.py's) runs diffusers' own forward. On a CPU, and without Triton,
the same steps run as the eager formula, bit for bit the unfused float8 path (the tests' check).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from . import fp8_gemm
from .fp8_gemm import Fp8Linear, Fp8Rows, quantize_rows_reference
from .plain_attention import PlainAttention
from .zero_negative import unwrapped


def layer_norm_rows(norm: torch.nn.LayerNorm, x: torch.Tensor,
                    residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Fp8Rows]:
    """``(h, rows)``: ``h = x + residual`` (``x`` without one) and ``norm(h)`` as float8 rows, in one kernel where
    :func:`~dreambooth_pl.fp8_gemm.runs_kernels`.

    Args:
        norm: an affine LayerNorm over ``x``'s last dimension.
        x: ``[..., K]``, e.g. an attention's output.
        residual: the residual stream it adds to (same shape and dtype), or None.
    """
    shape, k = x.shape, x.shape[-1]
    if fp8_gemm.runs_kernels(x) and (residual is None or residual.dtype == x.dtype):
        from . import fp8_quant_kernel

        h, q, s = fp8_quant_kernel.layer_norm_rows(
            x.reshape(-1, k).contiguous(), None if residual is None else residual.reshape(-1, k).contiguous(),
            norm.weight, norm.bias, norm.eps)
        return (x if h is None else h.view(shape)), Fp8Rows(q, s, shape, x.dtype)
    h = x if residual is None else x + residual
    q, s = quantize_rows_reference(F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                                   .reshape(-1, k))
    return h, Fp8Rows(q, s, shape, x.dtype)


def gated_gelu_rows(a: torch.Tensor, g: torch.Tensor) -> Fp8Rows:
    """``a · gelu(g)`` (GEGLU's activation, exact gelu as diffusers') as float8 rows, in one kernel where
    :func:`~dreambooth_pl.fp8_gemm.runs_kernels`."""
    shape, k = a.shape, a.shape[-1]
    if fp8_gemm.runs_kernels(a) and a.shape == g.shape and a.dtype == g.dtype:
        from . import fp8_quant_kernel

        q, s = fp8_quant_kernel.gated_gelu_rows(a.reshape(-1, k).contiguous(), g.reshape(-1, k).contiguous())
    else:
        q, s = quantize_rows_reference((a * F.gelu(g)).reshape(-1, k))
    return Fp8Rows(q, s, shape, a.dtype)


def qualifies(block: torch.nn.Module) -> bool:
    """Whether ``block`` is a diffusers ``BasicTransformerBlock`` of SDXL's form: affine LayerNorms before
    self-attention, cross-attention and a GEGLU feed-forward, nothing else in between (no positional embedding,
    ada-norms, chunked feed-forward or cross-attention-only first attention)."""
    if type(block).__name__ != "BasicTransformerBlock" or getattr(block, "norm_type", None) != "layer_norm":
        return False
    norms = [getattr(block, n, None) for n in ("norm1", "norm2", "norm3")]
    if not all(type(n) is torch.nn.LayerNorm and n.weight is not None and n.bias is not None for n in norms):
        return False
    net = list(getattr(getattr(block, "ff", None), "net", ()))
    return (block.pos_embed is None and not block.only_cross_attention and block._chunk_size is None
            and block.attn2 is not None and len(net) in (3, 4) and type(net[0]).__name__ == "GEGLU"
            and all(isinstance(m, torch.nn.Dropout) for m in net[1:2] + net[3:]))


def _float8_layers(block) -> bool:
    """The block's projections are float8 and its attentions go through plain processors (read each call:
    fp8_gemm.restore, plain_attention.restore and ConstantNegative.remove change them under the patch)."""
    a1, a2, net = block.attn1, block.attn2, block.ff.net
    layers = (a1.to_q, a1.to_k, a1.to_v, a1.to_out[0], a2.to_q, a2.to_out[0], net[0].proj, net[2])
    return (all(type(m) is Fp8Linear for m in layers) and type(a1.processor) is PlainAttention
            and type(unwrapped(a2.processor)) is PlainAttention)


def _forward(self, hidden_states: torch.Tensor, attention_mask=None, encoder_hidden_states=None,
             encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
             added_cond_kwargs=None) -> torch.Tensor:
    """diffusers' ``BasicTransformerBlock.forward`` for SDXL's layer-norm blocks, with float8 rows between the
    norms, the GEGLU and the GEMMs (the module docstring); its own forward outside the plain case."""
    if (attention_mask is not None or encoder_attention_mask is not None or cross_attention_kwargs
            or encoder_hidden_states is None or hidden_states.ndim != 3 or self.training
            or torch.compiler.is_compiling() or (torch.is_grad_enabled() and hidden_states.requires_grad)
            or not _float8_layers(self)):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    _, rows = layer_norm_rows(self.norm1, hidden_states)
    attn = self.attn1(rows)
    h, rows = layer_norm_rows(self.norm2, attn, hidden_states)
    attn = self.attn2(rows, encoder_hidden_states=encoder_hidden_states)
    h, rows = layer_norm_rows(self.norm3, attn, h)
    net = self.ff.net  # [GEGLU, Dropout, Linear(, Dropout)]: the dropouts are the identity in eval mode
    return net[2](gated_gelu_rows(*net[0].proj.halves(rows))) + h


def fuse(unet: torch.nn.Module) -> int:
    """Give every qualifying transformer block of ``unet`` (:func:`qualifies`) the fused forward; returns how many.
    Call it after fp8_gemm.to_fp8; the blocks check their layers at each call."""
    blocks = [m for m in unet.modules() if qualifies(m) and "forward" not in vars(m)]
    for m in blocks:
        m.forward = types.MethodType(_forward, m)
    return len(blocks)


def unfuse(unet: torch.nn.Module) -> int:
    """Undo :func:`fuse`; returns how many blocks got their class's forward back."""
    blocks = [m for m in unet.modules() if getattr(vars(m).get("forward"), "__func__", None) is _forward]
    for m in blocks:
        del m.forward
    return len(blocks)
