"""The UNet blocks' non-matmul work in fewer passes over memory: norms in the compute dtype, GEGLU in one kernel.

With the CUDA-graph step the GPU time follows the memory traffic of the elementwise kernels (BENCHMARKS.md
profile), and two patterns of SDXL's blocks double it under autocast:

- **Norms.** Autocast runs ``layer_norm`` and ``group_norm`` in fp32: the half-precision input is cast up, the
  output comes back fp32, every consumer casts it down again (q, k and v each their own copy) and in the
  backward the fp32 gradients are cast and summed. :func:`half_norms` runs them on the half input with autocast
  off. The CUDA kernels accumulate mean and variance in fp32 either way, and the matmul and convolution
  consumers would have rounded the output to half precision anyway, so they see the same values up to rounding.
  What does change: elementwise consumers (the SiLU after each resnet GroupNorm) now run in the half dtype, and
  the backward sums the consumers' gradients in it (bf16 tolerance; tests/test_block_ops.py, ``-m gpu`` too).
- **GEGLU** (Shazeer 2020, ``a · gelu(g)`` of one projection's two halves). ``chunk`` makes both halves strided,
  so diffusers' eager version runs gelu, the product and their backward as non-vectorised kernels and ends the
  backward with a ``cat`` (about 24 ms of a 150 ms step on an H200). :func:`fuse_geglu` computes the halves as
  two GEMMs on the weight's row blocks, so both are contiguous, and the activation in one compiled kernel
  forward and one backward (``torch.compile`` of the pointwise function alone: seconds to build, cached between
  runs), on CUDA; elsewhere the same formula runs eagerly. Compiling diffusers' strided form instead gave a
  backward kernel of 178 us per block (H200 profile, BENCHMARKS.md).

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


def gated_gelu(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a · gelu(g)`` of two contiguous tensors: the kernel :func:`fuse_geglu` compiles (one pass forward, one
    backward writing both gradients)."""
    return a * F.gelu(g)


def gated_gelu_fixed(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """:func:`gated_gelu` for the prior sampler's fixed batches: its own code object, so its compiled shapes do
    not count against the training activation's recompile limit (dynamo keys both on the function's code)."""
    return a * F.gelu(g)


COMPILE_ON = ("cuda",)  # devices whose activation is compiled (Inductor's Triton kernels); elsewhere eager
BACKEND = "inductor"
_compiled: dict[bool, object] = {}


def can_compile(device: torch.device) -> bool:
    """Whether the activation is compiled on ``device``: a GPU with Triton installed (Inductor's GPU kernels need
    it; without it the same formula runs eagerly)."""
    from torch.utils._triton import has_triton

    return device.type in COMPILE_ON and has_triton()


def _gated_gelu(a: torch.Tensor, g: torch.Tensor, fixed_shapes: bool = False) -> torch.Tensor:
    # sampling in training (validation grids): shapes vary and it is not the hot path; the prior sampler's fixed
    # batches are (``fixed_shapes``)
    # inside a compiled region (compile_blocks) Inductor fuses the formula itself, and nothing here is traced
    if torch.compiler.is_compiling() or not (fixed_shapes or torch.is_grad_enabled()) or not can_compile(a.device):
        return gated_gelu(a, g)
    if fixed_shapes not in _compiled:  # one small pointwise graph per shape; Inductor's caches keep it across runs
        # no fullgraph: past dynamo's recompile limit (8 shapes, e.g. many aspect buckets) a new shape runs
        # eagerly instead of failing the fit
        _compiled[fixed_shapes] = torch.compile(gated_gelu_fixed if fixed_shapes else gated_gelu, dynamic=False,
                                                backend=BACKEND)
    return _compiled[fixed_shapes](a, g)


def _halves(proj: torch.nn.Linear, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the two halves as two GEMMs on the weight's row blocks (views): each output is contiguous, so the
    # activation and its backward read and write whole vectors, and the backward needs no ``cat``
    half = proj.out_features // 2
    bias = (None, None) if proj.bias is None else (proj.bias[:half], proj.bias[half:])
    return F.linear(hidden_states, proj.weight[:half], bias[0]), F.linear(hidden_states, proj.weight[half:], bias[1])


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if type(self.proj) is not torch.nn.Linear:  # an adapter on the projection: diffusers' own forward
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return _gated_gelu(*_halves(self.proj, hidden_states))


def _geglu_forward_fixed(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if type(self.proj) is not torch.nn.Linear:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return _gated_gelu(*_halves(self.proj, hidden_states), fixed_shapes=True)


def fuse_geglu(model: torch.nn.Module, fixed_shapes: bool = False) -> int:
    """Route every diffusers ``GEGLU`` of ``model`` through the split projection and the one-kernel activation.
    Returns the count.

    Args:
        model: the UNet.
        fixed_shapes: also compile the activation without autograd (the prior sampler: every batch has one shape,
            so one kernel per width serves the whole draw); otherwise only training steps use the compiled kernel.
    """
    from diffusers.models.activations import GEGLU

    layers = [m for m in model.modules() if type(m) is GEGLU]
    for m in layers:
        m.forward = types.MethodType(_geglu_forward_fixed if fixed_shapes else _geglu_forward, m)
    return len(layers)


def unfuse_blocks(model: torch.nn.Module) -> int:
    """Undo :func:`half_norms` and :func:`fuse_geglu`. Returns the number of modules restored."""
    patched = (_half_norm, _geglu_forward, _geglu_forward_fixed)
    mods = [m for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) in patched]
    for m in mods:
        del m.forward
    return len(mods)
