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
import weakref

import torch

# id(parameter) -> its half-precision copy for the current UNet call (half_adapters); empty outside that call
_HALF: dict[int, torch.Tensor] = {}
# grouped q/k/v (fuse_lora_layers(group_qkv=True)): to_q -> (to_k, to_v); a sibling -> (its input, its output) that
# the group's node computed with to_q's call, handed out when the sibling is called on that same tensor
_GROUPS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_PENDING: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


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


class _LoraGroup(torch.autograd.Function):
    """Frozen linears + LoRA of ``n`` projections that share their input (q, k, v of self-attention) in one node:
    the down-projections are one ``x [A_1; ...; A_n]ᵀ`` (one read of ``x`` instead of ``n``), the backward sums the
    input gradients in place and computes every ``A`` gradient in one GEMM (Hu et al. 2021, eq. 3, per projection).
    ``tensors``: the ``n`` frozen weights, ``n`` biases (or None), ``n`` A and ``n`` B, in the compute dtype."""

    @staticmethod
    def forward(ctx, x, scales: tuple, *tensors):
        n = len(scales)
        weights, biases, a, b = (tensors[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat(a)  # [n r, in]
        xa = torch.mm(x2, a_cat.t())  # [tokens, n r], unscaled
        outs, start = [], 0
        for w, bias, lb, s in zip(weights, biases, b, scales):
            r = lb.shape[1]
            out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
            out.addmm_(xa[:, start:start + r], lb.t(), alpha=s)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += r
        ctx.scales, ctx.has_bias, ctx.x_shape = scales, [bias is not None for bias in biases], x.shape
        ctx.save_for_backward(x2, a_cat, xa, *weights, *b)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x2, a_cat, xa, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, b = rest[:n], rest[n:]
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        # an output never used (a sibling called on another tensor) has no gradient: its terms are zero
        gb = torch.cat([xa.new_zeros(xa.shape[0], lb.shape[1]) if g is None else _scaled_mm(g, lb, s)
                        for g, lb, s in zip(g2, b, ctx.scales)], dim=1)  # [tokens, n r]
        grad_x = None
        if ctx.needs_input_grad[0] and any(g is not None for g in g2):
            for g, w in zip(g2, weights):  # the input gradients summed in place, not by autograd's adds
                if g is not None:
                    grad_x = torch.mm(g, w) if grad_x is None else grad_x.addmm_(g, w)
            grad_x = grad_x.addmm_(gb, a_cat).view(*ctx.x_shape[:-1], x2.shape[1])
        grad_a = torch.mm(gb.t(), x2).split([lb.shape[1] for lb in b])
        grad_b, start = [], 0
        for g, lb, s in zip(g2, b, ctx.scales):
            r = lb.shape[1]
            grad_b.append(torch.zeros_like(lb) if g is None else _scaled_mm(g.t(), xa[:, start:start + r], s))
            start += r
        grad_bias = [None if not has or g is None else g.sum(0) for g, has in zip(g2, ctx.has_bias)]
        return (grad_x, None, *(None,) * n, *grad_bias, *grad_a, *grad_b)


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
    weights = [p for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) in _FORWARDS
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
        _PENDING.clear()


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


def _parts(layer, name: str, dtype: torch.dtype) -> tuple:
    """(weight, bias, A, B, scale) of a fused layer in ``dtype``; A and B from the bulk copy when there is one."""
    base = layer.get_base_layer()
    bias = None if base.bias is None else base.bias.to(dtype)
    a, b = (_HALF.get(id(w)) for w in (layer.lora_A[name].weight, layer.lora_B[name].weight))
    a = a if a is not None and a.dtype == dtype else layer.lora_A[name].weight.to(dtype)
    b = b if b is not None and b.dtype == dtype else layer.lora_B[name].weight.to(dtype)
    return base.weight.to(dtype), bias, a, b, float(layer.scaling[name])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's choice, made once per call: the Functions run with autocast off on tensors of one dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    dtype = _compute_dtype(x)
    parts = _parts(self, name, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x.to(dtype), *parts)


def _forward_grouped(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """to_q of a group: q, k and v in one node; k and v wait for their layers' calls on this same ``x``."""
    layers = (self, *_GROUPS.get(self, ()))
    name = _fusable(self, x, args, kwargs)
    if name is None or len(layers) == 1 or not all(
            _fusable(m, x, (), {}) == name and not m.get_base_layer().weight.requires_grad for m in layers):
        return _forward(self, x, *args, **kwargs)
    _PENDING.clear()  # a group whose siblings were never called (an error mid-forward) keeps nothing alive
    dtype = _compute_dtype(x)
    weights, biases, a, b, scales = zip(*(_parts(m, name, dtype) for m in layers))
    with torch.autocast(x.device.type, enabled=False):
        outs = _LoraGroup.apply(x.to(dtype), scales, *weights, *biases, *a, *b)
    for m, out in zip(layers[1:], outs[1:]):
        _PENDING[m] = (x, out)
    return outs[0]


def _forward_sibling(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """to_k / to_v of a group: the output its group computed on this very tensor, else its own fused forward."""
    pending = _PENDING.pop(self, None)
    if pending is not None and pending[0] is x and not args and not kwargs:
        return pending[1]
    return _forward(self, x, *args, **kwargs)


_FORWARDS = (_forward, _forward_grouped, _forward_sibling)


def fuse_lora_layers(model: torch.nn.Module, group_qkv: bool = False) -> int:
    """Route every peft ``lora.Linear`` of ``model`` through the fused node (an instance attribute: the class
    and other models are untouched). Returns the number of layers routed.

    Args:
        model: the adapted model.
        group_qkv: also compute each self-attention's q, k and v in one node (:class:`_LoraGroup`) when the
            three are called on the same tensor, q first (diffusers' attention processors); see
            :func:`grouped_attentions`.
    """
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    if group_qkv:
        for m in model.modules():
            qkv = [getattr(m, k, None) for k in ("to_q", "to_k", "to_v")]
            if getattr(m, "is_cross_attention", True) is False and all(isinstance(p, Linear) for p in qkv):
                _GROUPS[qkv[0]] = tuple(qkv[1:])
                qkv[0].forward = types.MethodType(_forward_grouped, qkv[0])
                for sibling in qkv[1:]:
                    sibling.forward = types.MethodType(_forward_sibling, sibling)
    return len(layers)


def grouped_attentions(model: torch.nn.Module) -> int:
    """How many of ``model``'s q projections compute their attention's k and v with them."""
    return sum(m in _GROUPS for m in model.modules())


def unfuse_lora_layers(model: torch.nn.Module) -> int:
    """Undo :func:`fuse_lora_layers` (peft's forward again). Returns the number of layers restored."""
    layers = [m for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) in _FORWARDS]
    for m in layers:
        del m.forward
        _GROUPS.pop(m, None)
        _PENDING.pop(m, None)
    return len(layers)
