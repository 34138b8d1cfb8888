"""The UNet transformers' frozen linears as float8 GEMMs with row-wise scales (``torch._scaled_mm``), for drawing.

Hopper's tensor cores multiply float8 at twice their bf16/fp16 rate. Each linear inside the UNet's
``Transformer2DModel``s (attention projections, feed-forward, ``proj_in``/``proj_out``: 87 % of the UNet's weights)
keeps its weight as e4m3 with one fp32 scale per output channel, ``W ≈ diag(s_w) Q_w``, ``s_w = max|W_row| / 448``,
and each call scales its input the same way per row (dynamic scaling; Micikevicius et al. 2022, arXiv 2209.05433;
row-wise as torchao's float8 inference), so ``y = diag(s_x) Q_x Q_wᵀ diag(s_w) + b`` is one scaled GEMM with fp32
accumulation. The input's row scales and float8 copy come from one pass (fp8_quant_kernel.py on a GPU with Triton),
computed once for the projections that read one tensor (self-attention's q, k, v; cross-attention's k, v; the
GEGLU's two halves).

What it costs: e4m3 keeps 3 mantissa bits, so every product's inputs round to ~2⁻⁴ relative, and the draw leaves
the fp16 draw's trajectory: its images are other images of the same prompt (BENCHMARKS.md gives the distance). That
is why it is a switch (``data.priors.generation.fp8_gemms``) and part of the prior cache's key. With ``compile_blocks``
each compiled block (the transformer blocks; ``proj_in``/``proj_out`` stay eager) quantizes by the formula, which
Inductor fuses with the norm or activation producing it. Needs a GPU with float8 tensor cores (compute capability
8.9: Ada, Hopper); elsewhere :func:`supported` says no.
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
TINY = 1e-12  # an all-zero row's amax: its scale stays finite and its codes zero
REGIONS = ("Transformer2DModel",)  # the blocks whose linears change (the time and class embeddings' stay: 16 rows)


def supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs row-wise float8 GEMMs on ``device`` (CUDA, compute capability ≥ 8.9),
    or this is a CPU, whose ``_scaled_mm`` computes the same products (the tests)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: ``x [M, K]`` as e4m3 codes ``q`` and fp32 row scales ``s [M, 1]``, ``x ≈ s · q``; in fp32, so
    a large scale cannot overflow a half-precision reciprocal (the Triton kernel's formula, eagerly)."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp(min=TINY) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def runs_kernels(x: torch.Tensor) -> bool:
    """Whether ``x``'s rows are quantized by fp8_quant_kernel.py's Triton kernels: a CUDA tensor with Triton, outside
    a compiled region (``compile_blocks``: there the formula, which Inductor fuses into one kernel with its
    producer)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows_reference` of ``x``'s rows (its last dimension; ``[M, K]`` out) in one pass (Triton)
    where it can run (:func:`runs_kernels`), else eagerly."""
    x = x.reshape(-1, x.shape[-1])
    if runs_kernels(x):
        from . import fp8_quant_kernel

        return fp8_quant_kernel.quantize_rows(x.contiguous())
    return quantize_rows_reference(x)


class Fp8Rows:
    """A half-precision activation ``[..., K]`` held only as its rows' codes ``q [M, K]`` and scales ``s [M, 1]``,
    as the op that produced it wrote them (fp8_block.py): the float8 layers read it without quantizing, and the
    attention processors pass it on as they would the tensor (its ``shape``, ``ndim``, ``dtype``; a slice of the
    leading dimension, which zero_negative.py takes).

    Args:
        q, s: the codes and scales.
        shape: the activation's shape (``M`` = its product but the last).
        dtype: its half-precision dtype: the dtype the float8 layers write.
    """

    __slots__ = ("q", "s", "shape", "dtype")

    def __init__(self, q: torch.Tensor, s: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        self.q, self.s, self.shape, self.dtype = q, s, torch.Size(shape), dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: slice) -> "Fp8Rows":
        """Rows ``index`` of the leading dimension (a step-1 slice)."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"Fp8Rows takes a step-1 slice of its leading dimension, not {index!r}")
        start, stop, _ = index.indices(self.shape[0])
        stop = max(start, stop)
        per = self.q.shape[0] // max(self.shape[0], 1)  # rows per leading index
        s = self.s[start * per:stop * per]
        if start * per % 4:  # a scale vector off 16-byte alignment: the scaled GEMM's epilogue may assume it
            s = s.clone()
        return Fp8Rows(self.q[start * per:stop * per], s, (stop - start, *self.shape[1:]), self.dtype)


@functools.lru_cache(maxsize=None)
def _out_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the row-wise scaled GEMM writes on ``device``: ``dtype`` where it can, else bf16 (cast after);
    older PyTorch/cuBLAS pairs write row-wise scaled products only in bf16. Probed once per device and dtype."""
    if dtype == torch.bfloat16:
        return dtype
    a = torch.zeros(16, 16, device=device, dtype=FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         bias=torch.zeros(16, device=device, dtype=dtype), out_dtype=dtype)
        return dtype
    except (RuntimeError, ValueError):  # (a TORCH_CHECK_VALUE raises ValueError)
        return torch.bfloat16


def scaled_linear(q: torch.Tensor, s: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                  bias: Optional[torch.Tensor], dtype: torch.dtype, out: Optional[torch.dtype] = None) -> torch.Tensor:
    """``diag(s) q (diag(wscale) qweight)ᵀ + bias`` in ``dtype``: one row-wise scaled float8 GEMM.

    Args:
        q, s: the input's codes ``[M, K]`` and row scales ``[M, 1]`` (:func:`quantize_rows`).
        qweight, wscale: the weight's codes ``[N, K]`` and its output channels' scales ``[1, N]``.
        bias: ``[N]`` or None.
        dtype: the output's dtype.
        out: the dtype the GEMM writes (None: probed, :func:`_out_dtype`; a layer passes its own, probed eagerly).
    """
    out = out or _out_dtype(q.device, dtype)
    y = torch._scaled_mm(q, qweight.t(), scale_a=s, scale_b=wscale,
                         bias=None if bias is None else bias.to(out), out_dtype=out)
    return y if out == dtype else y.to(dtype)


_CALL = [0]  # the UNet forward under way (to_fp8's pre-hook counts them): a quantization serves only its own call
_HOOKS: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()  # unet -> its pre-hook


def _next_call(module, args) -> None:
    _CALL[0] += 1


class _SharedInput:
    """One input's quantization for the ``readers`` projections that read the same tensor object within one UNet
    call (self-attention's q, k, v; cross-attention's k, v): kept from the first reader's call to the last's, then
    dropped, so no layer holds its last input's codes (at 1024² and 16 rows they would be GBs, in the graphs'
    pools too). A weak reference, the tensor's version and the call count guard a reuse; never across calls: a
    graph captured in one call must record its own quantization of the text states, which a replay refills in
    place without Python seeing it (prior_sampler.py's graphs, keyed by shape, serve every prompt).

    Args:
        readers: how many projections read the input (1: nothing is kept).
    """

    def __init__(self, readers: int = 1):
        self.readers = readers
        self._ref, self._key, self._value, self._left = None, None, None, 0

    def get(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # traced: no memo; Inductor computes a repeated quantization once
            return quantize_rows(x)
        # (inference tensors keep no version counter: never reused)
        key = None if x.is_inference() else (_CALL[0], x._version)
        if key is not None and self._left > 0 and self._ref() is x and self._key == key:
            value, self._left = self._value, self._left - 1
            if not self._left:
                self.clear()
            return value
        value = quantize_rows(x)
        if self.readers > 1 and key is not None:
            self._ref, self._key, self._value, self._left = weakref.ref(x), key, value, self.readers - 1
        return value

    def clear(self) -> None:
        self._ref, self._key, self._value, self._left = None, None, None, 0


class Fp8Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` run as a row-wise scaled float8 GEMM (see the module docstring); ``inner`` keeps the
    original layer (its half-precision weight too) for :func:`restore`.

    Args:
        linear: the layer (its weight ``[N, K]`` with ``N`` and ``K`` multiples of 16, as ``_scaled_mm`` needs).
        shared: the quantized-input slot this layer shares with the projections that read the same input.
    """

    def __init__(self, linear: torch.nn.Linear, shared: Optional[_SharedInput] = None):
        super().__init__()
        self.inner = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_rows_reference(linear.weight.detach())
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("wscale", s.reshape(1, -1), persistent=False)
        self.shared = shared or _SharedInput(1)
        self._out = _out_dtype(linear.weight.device, linear.weight.dtype)  # probed here, not inside a trace

    @property
    def bias(self) -> Optional[torch.Tensor]:  # (zero_negative.py reads the output projection's bias)
        return self.inner.bias

    @property
    def weight(self) -> torch.Tensor:  # the layer's half-precision weight, for code that only reads its dtype
        return self.inner.weight

    def forward(self, x: "torch.Tensor | Fp8Rows") -> torch.Tensor:
        q, s = (x.q, x.s) if isinstance(x, Fp8Rows) else self.shared.get(x)
        y = scaled_linear(q, s, self.qweight, self.wscale, self.inner.bias, x.dtype, self._outputs(x))
        return y.reshape(*x.shape[:-1], self.out_features)

    def halves(self, x: "torch.Tensor | Fp8Rows") -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of the weight's two row halves (a GEGLU's value and gate), from one quantization of ``x``."""
        q, s = (x.q, x.s) if isinstance(x, Fp8Rows) else quantize_rows(x)
        n, b = self.out_features // 2, self.inner.bias
        outs = [scaled_linear(q, s, self.qweight[rows], self.wscale[:, rows], None if b is None else b[rows],
                              x.dtype, self._outputs(x)).reshape(*x.shape[:-1], n)
                for rows in (slice(0, n), slice(n, None))]
        return outs[0], outs[1]

    def _outputs(self, x: torch.Tensor) -> Optional[torch.dtype]:
        return self._out if x.dtype == self.inner.weight.dtype else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn, row-wise scales"


def _fits(layer: torch.nn.Module) -> bool:
    return type(layer) is torch.nn.Linear and not layer.weight.requires_grad and \
        layer.in_features % 16 == 0 and layer.out_features % 16 == 0 and layer.out_features // 2 % 16 == 0


def to_fp8(unet: torch.nn.Module) -> int:
    """Replace every fitting frozen ``nn.Linear`` inside the UNet's transformers by an :class:`Fp8Linear`
    (projections of one attention that read one input share its quantization); returns how many changed."""
    from diffusers.models.attention_processor import Attention

    changed = 0
    if unet not in _HOOKS:
        _HOOKS[unet] = unet.register_forward_pre_hook(_next_call)
    regions = [m for m in unet.modules() if type(m).__name__ in REGIONS]
    for region in regions:
        for attn in [m for m in region.modules() if isinstance(m, Attention)]:
            # q, k, v read one tensor in self-attention; k, v the text states in cross-attention
            names = [n for n in (("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v"))
                     if _fits(getattr(attn, n, None))]
            shared = _SharedInput(len(names))
            for name in names:
                setattr(attn, name, Fp8Linear(getattr(attn, name), shared))
                changed += 1
        for parent in [m for m in region.modules() if not isinstance(m, Fp8Linear)]:
            for name, child in list(parent.named_children()):
                if _fits(child):
                    setattr(parent, name, Fp8Linear(child))
                    changed += 1
    return changed


def restore(unet: torch.nn.Module) -> int:
    """Undo :func:`to_fp8`: each :class:`Fp8Linear` gives its original layer back; returns how many."""
    restored = 0
    hook = _HOOKS.pop(unet, None)
    if hook is not None:
        hook.remove()
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Fp8Linear):
                setattr(parent, name, child.inner)
                restored += 1
    return restored
