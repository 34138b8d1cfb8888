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
  two GEMMs on the weight's row blocks, so both are contiguous, and the activation in one hand-written Triton
  kernel forward and one backward (geglu_kernel.py: shape-generic, so nothing is compiled per batch or bucket, and
  no Inductor start-up lands in a run's first step), on a CUDA device with Triton; elsewhere the same formula runs
  eagerly. Compiling diffusers' strided form instead gave a backward kernel of 178 us per block (H200 profile,
  BENCHMARKS.md).

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
             and m.weight is not None and not m.weight.requires_grad and "forward" not in vars(m)]
    for m in norms:
        m.forward = types.MethodType(_half_norm, m)
    return len(norms)


def gated_gelu(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a · gelu(g)`` of two contiguous tensors: the formula geglu_kernel.py computes in one pass (forward) and
    one pass writing both gradients (backward)."""
    return a * F.gelu(g)


KERNEL_ON = ("cuda",)  # devices whose activation runs geglu_kernel.py's Triton kernels; elsewhere eager
_kernel_failed: list[str] = []  # the first launch's error, where Triton could not build the kernel here


def uses_kernel(device: torch.device) -> bool:
    """Whether the activation runs as the Triton kernels on ``device``: a GPU with Triton installed (without it
    the same formula runs eagerly)."""
    from torch.utils._triton import has_triton

    return device.type in KERNEL_ON and has_triton() and not _kernel_failed


def _gated_gelu(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # inside a compiled region (compile_blocks) Inductor fuses the formula itself, and nothing here is traced
    if torch.compiler.is_compiling() or not uses_kernel(a.device) or a.shape != g.shape or a.dtype != g.dtype \
            or not (a.is_contiguous() and g.is_contiguous()):
        return gated_gelu(a, g)
    from . import geglu_kernel

    try:
        return geglu_kernel.gated_gelu(a, g)
    except torch.OutOfMemoryError:  # the activation's memory, not the kernel: the formula would need as much
        raise
    except Exception as err:  # a Triton that cannot build the kernel: the eager formula, not a failed fit
        if a.is_cuda and torch.cuda.is_current_stream_capturing():  # no eager fallback inside a capture
            raise
        import warnings

        _kernel_failed.append(str(err))
        warnings.warn(f"perf.fused_blocks: the Triton GEGLU kernel failed ({str(err).splitlines()[0][:200]}); "
                      "the activation runs eagerly.", stacklevel=2)
        return gated_gelu(a, g)


def _halves(proj: torch.nn.Linear, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the two halves as two GEMMs on the weight's row blocks (views): each output is contiguous, so the
    # activation and its backward read and write whole vectors, and the backward needs no ``cat``
    half = proj.out_features // 2
    bias = (None, None) if proj.bias is None else (proj.bias[:half], proj.bias[half:])
    return F.linear(hidden_states, proj.weight[:half], bias[0]), F.linear(hidden_states, proj.weight[half:], bias[1])


def _geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if type(self.proj).__name__ == "Fp8Linear":  # fp8_gemm.py: both halves from one quantization of the input
        return _gated_gelu(*self.proj.halves(hidden_states))
    if type(self.proj) is not torch.nn.Linear:  # an adapter on the projection: diffusers' own forward
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return _gated_gelu(*_halves(self.proj, hidden_states))


def fuse_geglu(model: torch.nn.Module) -> int:
    """Route every diffusers ``GEGLU`` of ``model`` through the split projection and the one-kernel activation
    (with and without autograd: training steps, validation grids and the prior sampler alike). Returns the count."""
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
