"""``model.base_dtype``: the frozen base's linear layers stored in float8 or NF4 and upcast per layer.

- ``float8``: each frozen ``nn.Linear`` weight is stored as float8_e4m3fn (4 exponent, 3 mantissa bits, max 448;
  Micikevicius et al. 2022, arXiv 2209.05433) with one fp32 scale per output channel, ``W ≈ diag(s) Q``,
  ``s = max|W_row| / 448``. Each call upcasts ``Q`` to the compute dtype, multiplies by ``s`` and runs an ordinary
  half-precision GEMM: the storage is what shrinks, so it works on any CUDA card (T4 included: the float8 cast is a
  plain elementwise kernel) and the maths is the fp16 path's on a rounded weight. The backward re-upcasts instead
  of keeping the upcast weight alive, so the activations saved for backward do not grow by a weight copy.
- ``nf4``: bitsandbytes' ``Linear4bit`` (QLoRA's 4-bit NormalFloat with double-quantised block scales; Dettmers et
  al. 2023, arXiv 2305.14314), dequantised per call by its kernels.

Only the UNet's frozen linears change (87% of its weights: 2.23 of 2.57 B parameters; the 51 convolutions hold
0.33 B, and storing them in float8 would save 0.31 GiB for a second upcast path; it does not pay at the 8 GiB
target). Embeddings, norms, convolutions, biases and the text encoders keep their dtype. Quantising happens
after the adapters are injected, so peft's LoRA/DoRA/LoKr/LoHa layers wrap the quantized layer as their
``base_layer``: the adapters stay fp32 and ordinary, and export, merge and resume see exactly the fp16 path's keys.
"""
from __future__ import annotations

import functools
import warnings
from typing import Literal, Optional

import torch
import torch.nn.functional as F

BaseDtype = Literal["float16", "float8", "nf4"]
BASE_DTYPES = ("float16", "float8", "nf4")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
NF4_BLOCK = 64  # bitsandbytes' default block size: one absmax per 64 weights


def check_base_dtype(base_dtype: str) -> None:
    """Refuse an unknown ``model.base_dtype``, or ``nf4`` without bitsandbytes, before any model loads."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"model.base_dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    if base_dtype == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ValueError(f"model.base_dtype=nf4 needs bitsandbytes ({e}): pip install -c constraints.txt "
                             "bitsandbytes, or use model.base_dtype: float8 (plain torch).") from None


def fp8_quantize(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bits, scale)``: ``weight`` as float8_e4m3fn bits (a uint8 tensor) and its fp32 scale.

    Args:
        weight: ``[out, in]``.
        per_channel: one scale per output row (``[out, 1]``); else one for the tensor (``[1, 1]``).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1, 1)
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero row stores zeros
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    # stored as uint8: an integer tensor that Module.to(dtype) / .half() leave alone, and that the pipelines'
    # ``unet.dtype`` (the first floating parameter) never reports
    return q.view(torch.uint8), scale


def fp8_dequantize(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``diag(scale) Q`` in ``dtype`` (one cast and one in-place multiply: no fp32 temporary)."""
    return bits.view(FP8).to(dtype).mul_(scale.to(dtype))


class _Float8Matmul(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W`` upcast from float8 in forward and again in backward: only the float8 bits (not a
    half-precision copy of ``W``) stay saved for backward. ``W`` and ``b`` are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x, bits, scale, bias):
        ctx.save_for_backward(bits, scale)
        return F.linear(x, fp8_dequantize(bits, scale, x.dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        bits, scale = ctx.saved_tensors
        grad_x = torch.matmul(grad, fp8_dequantize(bits, scale, grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class Float8Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in float8_e4m3fn with a per-channel (or per-tensor) scale.

    Args:
        linear: the layer to store (its weight must be frozen).
        device: where the stored weight lives (None: the layer's device).
        per_channel: one scale per output channel (else one per tensor).
    """

    def __init__(self, linear: torch.nn.Linear, device: Optional[torch.device] = None, per_channel: bool = True):
        super().__init__()
        if linear.weight.requires_grad:
            raise ValueError("Float8Linear stores frozen weights only; this layer's weight trains")
        device = device or linear.weight.device
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bits, scale = fp8_quantize(linear.weight.to(device))
        self.register_buffer("qweight", bits)
        self.register_buffer("scale", scale)
        # the nominal dtype of the layer (what ``weight`` dequantises to); follows Module.to(dtype) like a weight would
        self.register_buffer("dtype_ref", torch.empty(0, dtype=linear.weight.dtype, device=device), persistent=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(device),
                                                                         requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a fresh tensor): what peft's ``dequantize_module_weight`` reads (DoRA's norm)."""
        return fp8_dequantize(self.qweight, self.scale, self.dtype_ref.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(device, enabled=False):  # one dtype inside the node, autocast's choice
            return _Float8Matmul.apply(x.to(dtype), self.qweight, self.scale, bias)

    def _apply(self, fn, recurse=True):
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.qweight.device)  # .half() / .to(dtype) would round the fp32 scale
        return self

    def extra_repr(self) -> str:
        per = "channel" if self.scale.shape[0] > 1 else "tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn, per-{per} scale"


@functools.cache
def _linear4bit_class():
    """bitsandbytes' ``Linear4bit`` returning what ``nn.Linear`` returns under autocast (built on first use: the
    import of bitsandbytes stays lazy)."""
    import bitsandbytes as bnb

    class Linear4bit(bnb.nn.Linear4bit):
        """``Linear4bit`` whose input is cast to the autocast dtype first. bitsandbytes casts its output back to
        the input's dtype, so after a LayerNorm/GroupNorm (fp32 under autocast) every projection returned fp32 and
        the residual stream of each transformer block turned fp32: twice the activations of the fp16 path."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
            return super().forward(x)

    return Linear4bit


def nf4_linear(linear: torch.nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4, double-quantised block scales, uint8 storage) holding ``linear``'s
    frozen weight, quantised on ``device``; it computes in ``compute_dtype`` and, under autocast, returns the
    autocast dtype as ``nn.Linear`` does."""
    import bitsandbytes as bnb

    q = _linear4bit_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                          quant_storage=torch.uint8, device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", quant_storage=torch.uint8, blocksize=NF4_BLOCK)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    # on a CPU with AVX512-BF16, an eval-mode no-grad call repacks the weight in place for a kernel that has no
    # backward; a later training call would then get no input gradient
    q.support_avx512bf16_for_cpu = False
    return q.to(device)  # Params4bit quantises when it moves


def is_quantized(module: torch.nn.Module) -> bool:
    """A layer this module stored in float8 or NF4."""
    return isinstance(module, Float8Linear) or type(module).__name__ == "Linear4bit"


def quantize_base(model: torch.nn.Module, base_dtype: BaseDtype, compute_dtype: torch.dtype,
                  device: Optional[torch.device] = None, fused_lora: bool = False) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` (those inside peft's adapter layers included, as their
    ``base_layer``) by its float8 or NF4 form, layer by layer on ``device``; returns the number replaced.

    Args:
        model: the UNet, adapters already injected.
        base_dtype: ``float16`` (nothing changes), ``float8`` or ``nf4``.
        compute_dtype: the dtype the layers compute in (the trainer's half dtype; fp32 on a CPU).
        device: where the stored weights go (None: each layer's device). On the GPU, quantising there takes
            seconds and only one layer's half-precision weight is ever copied over.
        fused_lora: ``model.perf.fused_lora`` is on: its fused node would save the upcast weight for backward,
            so quantized layers keep peft's forward (a warning says how many).
    """
    check_base_dtype(base_dtype)
    if base_dtype == "float16":
        return 0
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and not m.weight.requires_grad]  # exact type: not Linear4bit again
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = (Float8Linear(linear, device) if base_dtype == "float8"
               else nf4_linear(linear, compute_dtype, device or linear.weight.device))
        setattr(parent, child, new)
    if fused_lora:
        adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A") and is_quantized(m.get_base_layer()))
        warnings.warn(f"model.perf.fused_lora: the {adapted} adapted layers on the {base_dtype} base keep peft's "
                      "forward (the fused node would keep each upcast weight alive until backward).", stacklevel=2)
    return len(targets)


def stored_bytes(model: torch.nn.Module, base_dtype: BaseDtype) -> int:
    """Bytes ``model``'s parameters and buffers would take with its frozen linears stored as ``base_dtype``
    (computed from shapes, nothing quantised): what ``memory_plan`` compares before choosing."""
    per_weight = {"float8": lambda n, rows: n + 4 * rows,  # the bits and one fp32 scale per row
                  # 4 bits, an 8-bit absmax per block, an fp32 absmax per 256 blocks
                  "nf4": lambda n, rows: n // 2 + n // NF4_BLOCK + 4 * n // (NF4_BLOCK * 256)}
    total = 0
    for m in model.modules():
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            frozen_linear = type(m) is torch.nn.Linear and t is m.weight and not t.requires_grad
            total += (per_weight[base_dtype](t.numel(), t.shape[0]) if frozen_linear and base_dtype in per_weight
                      else t.numel() * t.element_size())
    return total


def storage_gib(unet: torch.nn.Module, weights_gib: float) -> dict[str, float]:
    """A run's resident weights (GiB) if its UNet's frozen linears were stored as ``float8`` / ``nf4`` instead:
    what ``memory_plan``'s hint compares (computed from shapes). Empty when the UNet is already quantized.

    Args:
        unet: the run's UNet, stored as loaded.
        weights_gib: the run's resident weights as the plan counts them.
    """
    from .memory_plan import GIB

    if any(is_quantized(m) for m in unet.modules()):
        return {}
    full = stored_bytes(unet, "float16") / GIB
    return {name: weights_gib - full + stored_bytes(unet, name) / GIB for name in ("float8", "nf4")}


def storage_hint(storage: dict[str, float], choose, current=None) -> str:
    """A sentence naming what ``model.base_dtype: float8`` / ``nf4`` would let ``memory_plan: auto`` pick, when
    that is a faster plan than ``current`` (or any plan when ``current`` is None: nothing fits). The plan never
    switches the storage itself: rounding the base changes the maths, which ``model.perf`` switches must not.

    Args:
        storage: resident GiB per storage (:func:`storage_gib`).
        choose: resident GiB -> the plan that fits (raises ``memory_plan.MemoryPlanError`` when none does).
        current: the plan chosen for the float16 base.
    """
    from .memory_plan import MemoryPlanError

    options = []
    for name, weights in storage.items():
        try:
            plan = choose(weights)
        except MemoryPlanError:
            continue
        if current is None or plan.s_per_step < current.s_per_step:
            options.append(f"model.base_dtype: {name} ({weights:.1f} GiB of weights) would allow '{plan.name}'")
    return ("; ".join(options) + " (docs/performance.md: what the storage costs in quality).") if options else ""
