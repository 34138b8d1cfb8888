"""The UNet blocks' non-matmul work in fewer passes over memory: norms in the compute dtype, GEGLU in one kernel.

With the CUDA-graph step the GPU time follows the memory traffic of the elementwise kernels (BENCHMARKS.md
profile), and two patterns of SDXL's blocks double it under autocast:

- **Norms.** Autocast runs ``layer_norm`` and ``group_norm`` in fp32: the half-precision input is cast up, the
  output comes back fp32, every consumer casts it down again (q, k and v each their own copy) and in the
  backward the fp32 gradients are cast and summed. :func:`half_norms` runs them on the half input with autocast
  off. The CUDA kernels accumulate mean and variance in fp32 either way, and the consumers would have rounded
  the output to half precision anyway (their matmuls and convolutions run in it), so the values match to the
  last bit of rounding; only the backward's sum of the consumers' gradients happens in the half dtype.
- **GEGLU** (Shazeer 2020, ``a · gelu(g)`` of one projection's two halves). ``chunk`` makes both halves strided,
  so diffusers' eager version runs gelu, the product and their backward as non-vectorised kernels and ends the
  backward with a ``cat``. :func:`fuse_geglu` computes the activation in one compiled kernel forward and one
  backward (``torch.compile`` of the pointwise function alone: seconds to build, cached between runs), on CUDA;
  elsewhere the same formula runs eagerly.

Both are instance attributes on the modules (``perf.fused_blocks``); weights and state dicts are untouched.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _half_norm(self, x: torch.Tensor) -> torch.Tensor:
    """The norm in ``x``'s own half dtype when autocast would run it in fp32; the class's forward otherwise."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype not in (torch.float16, torch.bfloat16) \
            or self.weight is None or self.weight.dtype != x.dtype:
        return type(self).forward(self, x)
    with torch.autocast(device, enabled=False):
        if isinstance(self, torch.nn.GroupNorm):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def half_norms(model: torch.nn.Module) -> int:
    """Run ``model``'s LayerNorms and GroupNorms in the input's half dtype under autocast (frozen half weights
    only). Returns the number of norms changed."""
    norms = [m for m in model.modules() if type(m) in (torch.nn.LayerNorm, torch.nn.GroupNorm)
             and m.weight is not None and not m.weight.requires_grad]
    for m in norms:
        m.forward = types.MethodType(_half_norm, m)
    return len(norms)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``a · gelu(g)`` of the last dimension's two halves ``[a | g]`` (diffusers' ``GEGLU`` after its projection)."""
    a, g = h.chunk(2, dim=-1)
    return a * F.gelu(g)


_compiled = None


def _geglu_act(h: torch.Tensor) -> torch.Tensor:
    global _compiled
    if h.device.type != "cuda" or not torch.is_grad_enabled():  # sampling's shapes vary and it is not the hot path
        return geglu(h)
    if _compiled is None:  # a small pointwise graph per shape; Inductor's caches keep it across runs
        _compiled = torch.compile(geglu, fullgraph=True)
    return _compiled(h)


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return _geglu_act(self.proj(hidden_states))


def fuse_geglu(model: torch.nn.Module) -> int:
    """Route every diffusers ``GEGLU`` of ``model`` through the one-kernel activation. Returns the count."""
    from diffusers.models.activations import GEGLU

    layers = [m for m in model.modules() if type(m) is GEGLU]
    for m in layers:
        m.forward = types.MethodType(_geglu_forward, m)
    return len(layers)


def unfuse_blocks(model: torch.nn.Module) -> int:
    """Undo :func:`half_norms` and :func:`fuse_geglu`. Returns the number of modules restored."""
    patched = (_half_norm, _geglu_forward)
    mods = [m for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) in patched]
    for m in mods:
        del m.forward
    return len(mods)
