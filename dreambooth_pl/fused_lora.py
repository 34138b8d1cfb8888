"""A LoRA linear layer in fewer, larger kernels: ``y = x Wᵀ + b + s (x Aᵀ) Bᵀ`` (Hu et al. 2021, eq. 3).

peft's ``lora.Linear`` runs the frozen layer, then ``lora_B(lora_A(x)) * scaling`` and an add: the up-projection,
the scaling and the add each read and write a full activation, and the backward repeats that (scale, a second
full-size matmul, an accumulating add). Here the frozen matmul and the adapter share one autograd node:

- forward: ``out = x Wᵀ (+ b)``, then ``out += (s · x Aᵀ) Bᵀ`` in place (one ``addmm_``: no full-size temporary);
- backward: ``gx = g W``, then ``gx += (s · g B) A`` in place; ``gA = (s · g B)ᵀ x``, ``gB = gᵀ (s · x Aᵀ)``.

Per adapted layer and step that removes two kernels and four full-size passes over the activation; with the
UNet's 560 adapted projections and the CUDA-graph step, kernel count is what the step's time follows
(BENCHMARKS.md profile). The parameters stay peft's own (``lora_A``/``lora_B``), so export, merging, EMA and
resume see ordinary peft adapters; any state the fused path does not cover (DoRA and other variants, dropout,
several active adapters, merged or disabled adapters) runs peft's forward unchanged.
"""
from __future__ import annotations

import contextlib
import types

import torch

# id(parameter) -> its half-precision copy for the current UNet call (half_adapters); empty outside that call
_HALF: dict[int, torch.Tensor] = {}


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in one GEMM (cuBLAS alpha; with beta 0 the empty input is never read)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)


class _LoraLinear(torch.autograd.Function):
    """Frozen linear + LoRA in one node; every tensor is already in the compute dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        xa = _scaled_mm(x2, lora_a.t(), scale)  # [tokens, r]: the only activation the adapter adds
        out.addmm_(xa, lora_b.t())
        ctx.scale = scale
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, xa = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = _scaled_mm(g2, lora_b, ctx.scale)  # [tokens, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, weight).addmm_(gb, lora_a).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(gb.t(), x2)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(g2.t(), xa)
        grad_w = torch.mm(g2.t(), x2) if ctx.needs_input_grad[1] else None  # only if the base itself trains
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


class _HalfCopies(torch.autograd.Function):
    """Half-precision copies of many fp32 weights in a few multi-tensor kernels, and their gradients back to fp32
    the same way (autocast would cast, and its backward un-cast, each weight in its own kernel)."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        out = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(out, list(weights))
        return tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        out = [torch.empty_like(g, dtype=torch.float32) for g in grads]
        torch._foreach_copy_(out, list(grads))
        return (None, *out)


@contextlib.contextmanager
def half_adapters(model: torch.nn.Module, dtype: torch.dtype):
    """Within: the fused layers of ``model`` read their fp32 adapters through one bulk half-precision copy made
    on entry (differentiable; gradients come back fp32). A no-op when no fused layer has fp32 adapters."""
    weights = [p for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) is _forward
               for d in (m.lora_A, m.lora_B) for p in (d[n].weight for n in m.active_adapters if n in d)
               if p.dtype == torch.float32 and p.requires_grad]
    if not weights or dtype == torch.float32:
        yield
        return
    _HALF.update(zip(map(id, weights), _HalfCopies.apply(dtype, *weights)))
    try:
        yield
    finally:
        _HALF.clear()


def _fusable(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The single active plain-LoRA adapter of ``layer`` when the fused path computes exactly peft's output."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.lora_B[name].bias is not None:
        return None  # dropout masks and peft's lora_bias are not in the fused node
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or not x.is_floating_point():
        return None
    if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == base.weight.dtype
                                                              == layer.lora_A[name].weight.dtype):
        return None  # peft's own input cast decides the dtype here
    return name


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    device = x.device.type
    # autocast's choice, made once here: the Function runs with autocast off on tensors of one dtype
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    bias = None if base.bias is None else base.bias.to(dtype)
    a, b = (_HALF.get(id(w)) for w in (self.lora_A[name].weight, self.lora_B[name].weight))
    a = a if a is not None and a.dtype == dtype else self.lora_A[name].weight.to(dtype)
    b = b if b is not None and b.dtype == dtype else self.lora_B[name].weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return _LoraLinear.apply(x.to(dtype), base.weight.to(dtype), bias, a, b, float(self.scaling[name]))


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every peft ``lora.Linear`` of ``model`` through the fused node (an instance attribute: the class
    and other models are untouched). Returns the number of layers routed."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    return len(layers)


def unfuse_lora_layers(model: torch.nn.Module) -> int:
    """Undo :func:`fuse_lora_layers` (peft's forward again). Returns the number of layers restored."""
    layers = [m for m in model.modules() if getattr(getattr(m, "forward", None), "__func__", None) is _forward]
    for m in layers:
        del m.forward
    return len(layers)
