"""A LoRA linear layer in fewer, larger kernels: ``y = x Wᵀ + b + s (x Aᵀ) Bᵀ`` (Hu et al. 2021, eq. 3).

peft's ``lora.Linear`` runs the frozen layer, then ``lora_B(lora_A(x)) * scaling`` and an add: the up-projection,
the scaling and the add each read and write a full activation, and the backward repeats that (scale, a second
full-size matmul, an accumulating add). Here the frozen matmul and the adapter share one autograd node:

- forward: ``out = x Wᵀ (+ b)``, then ``out += (s · x Aᵀ) Bᵀ`` in place (one ``addmm_``: no full-size temporary);
- backward: ``gx = g W``, then ``gx += (s · g B) A`` in place; ``gA = (s · g B)ᵀ x``, ``gB = gᵀ (s · x Aᵀ)``.
- layout: the rank-r activations live as ``[r, tokens]`` and B is read as ``Bᵀ``; with :func:`half_adapters`' bulk
  copy that ``Bᵀ`` is contiguous, so no GEMM has a leading dimension of r (cuBLAS's rank-4 GEMMs with an 8-byte
  leading dimension take ~2x as long). Without it ``Bᵀ`` is ``B.t()``, a view with r as leading dimension.

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

# id(parameter) -> its half-precision copy for the current UNet call (half_adapters; for LoRA's B the copy is Bᵀ);
# empty outside that call
_HALF: dict[int, torch.Tensor] = {}
# grouped projections (fuse_lora_layers(group_qkv=True)): to_q -> (to_k, to_v), a cross-attention's to_k -> (to_v,);
# a sibling -> (its input, its output) from its group's node, handed out when it is called on that same tensor
_GROUPS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_PENDING: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in one GEMM (cuBLAS alpha; with beta 0 the empty input is never read)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)


class _LoraLinear(torch.autograd.Function):
    """Frozen linear + LoRA in one node; every tensor is already in the compute dtype. ``lora_bt`` is ``Bᵀ``
    ([r, out]) and the rank-r activations are kept as ``[r, tokens]``: with a contiguous ``Bᵀ`` (the bulk copy)
    every adapter GEMM then has a leading dimension of ``tokens``, ``in`` or ``out``, never ``r`` (cuBLAS runs a
    rank-4 GEMM with an 8-byte leading dimension ~2x slower; benchmarks/rank_gemms.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_bt, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        xat = _scaled_mm(lora_a, x2.t(), scale)  # [r, tokens]: the only activation the adapter adds
        out.addmm_(xat.t(), lora_bt)
        ctx.scale = scale
        ctx.save_for_backward(x2, weight, lora_a, lora_bt, xat)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight, lora_a, lora_bt, xat = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gbt = _scaled_mm(lora_bt, g2.t(), ctx.scale)  # [r, tokens]
        grad_x = grad_a = grad_bt = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g2, weight).addmm_(gbt.t(), lora_a).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(gbt, x2)
        if ctx.needs_input_grad[4]:
            grad_bt = torch.mm(xat, g2)
        grad_w = torch.mm(g2.t(), x2) if ctx.needs_input_grad[1] else None  # only if the base itself trains
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, grad_a, grad_bt, None


class _LoraGroup(torch.autograd.Function):
    """Frozen linears + LoRA of ``n`` projections that share their input (q, k, v of self-attention; k, v of
    cross-attention) in one node: the down-projections are one ``[A_1; ...; A_n] xᵀ`` (one read of ``x`` instead of
    ``n``), the backward sums the input gradients in place and computes every ``A`` gradient in one GEMM (Hu et al.
    2021, eq. 3, per projection).
    ``tensors``: the ``n`` frozen weights, ``n`` biases (or None), ``n`` A and ``n`` Bᵀ, in the compute dtype;
    rank-r activations are ``[r, tokens]`` as in :class:`_LoraLinear`."""

    @staticmethod
    def forward(ctx, x, scales: tuple, *tensors):
        n = len(scales)
        weights, biases, a, bt = (tensors[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat(a)  # [n r, in]
        xat = torch.mm(a_cat, x2.t())  # [n r, tokens], unscaled
        outs, start = [], 0
        for w, bias, lbt, s in zip(weights, biases, bt, scales):
            r = lbt.shape[0]
            out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
            out.addmm_(xat[start:start + r].t(), lbt, alpha=s)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += r
        ctx.scales, ctx.has_bias, ctx.x_shape = scales, [bias is not None for bias in biases], x.shape
        ctx.save_for_backward(x2, a_cat, xat, *weights, *bt)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x2, a_cat, xat, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, bt = rest[:n], rest[n:]
        g2 = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        # an output never used (a sibling called on another tensor): autograd hands over zeros (materialised grads),
        # so the None branches below only guard a caller that turns materialisation off
        gbt, start = xat.new_zeros(xat.shape) if any(g is None for g in g2) else torch.empty_like(xat), 0  # [n r, tokens]
        for g, lbt, s in zip(g2, bt, ctx.scales):
            if g is not None:
                torch.addmm(gbt.new_empty(()), lbt, g.t(), beta=0, alpha=s, out=gbt[start:start + lbt.shape[0]])
            start += lbt.shape[0]
        grad_x = None
        if ctx.needs_input_grad[0] and any(g is not None for g in g2):
            for g, w in zip(g2, weights):  # the input gradients summed in place, not by autograd's adds
                if g is not None:
                    grad_x = torch.mm(g, w) if grad_x is None else grad_x.addmm_(g, w)
            grad_x = grad_x.addmm_(gbt.t(), a_cat).view(*ctx.x_shape[:-1], x2.shape[1])
        grad_a = torch.mm(gbt, x2).split([lbt.shape[0] for lbt in bt])
        grad_bt, start = [], 0
        for g, lbt, s in zip(g2, bt, ctx.scales):
            r = lbt.shape[0]
            grad_bt.append(torch.zeros_like(lbt) if g is None else _scaled_mm(xat[start:start + r], g, s))
            start += r
        grad_bias = [None if not has or g is None else g.sum(0) for g, has in zip(g2, ctx.has_bias)]
        return (grad_x, None, *(None,) * n, *grad_bias, *grad_a, *grad_bt)


def _transposed(tensors: list, dtype: torch.dtype) -> list:
    """Each ``[m, n]`` tensor as a contiguous ``[n, m]`` one in ``dtype``, a stack and one copy per shape (a
    per-tensor transpose would be a kernel each)."""
    out: list = [None] * len(tensors)
    shapes: dict = {}
    for i, t in enumerate(tensors):
        shapes.setdefault(tuple(t.shape), []).append(i)
    for (m, n), idx in shapes.items():
        stacked = torch.stack([tensors[i] for i in idx])
        flipped = torch.empty(len(idx), n, m, dtype=dtype, device=stacked.device)
        flipped.copy_(stacked.transpose(1, 2))
        for i, t in zip(idx, flipped.unbind(0)):
            out[i] = t
    return out


class _HalfCopies(torch.autograd.Function):
    """Half-precision copies of many fp32 weights in a few multi-tensor kernels, and their gradients back to fp32
    the same way (autocast would cast, and its backward un-cast, each weight in its own kernel). The first
    ``n_plain`` are copied as they are, the rest transposed (LoRA's B, read as Bᵀ by the fused nodes)."""

    @staticmethod
    def forward(ctx, dtype, n_plain: int, *weights):
        out = [torch.empty_like(w, dtype=dtype) for w in weights[:n_plain]]
        torch._foreach_copy_(out, list(weights[:n_plain]))
        ctx.n_plain = n_plain
        return (*out, *_transposed(list(weights[n_plain:]), dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        n = ctx.n_plain
        out = [torch.empty_like(g, dtype=torch.float32) for g in grads[:n]]
        torch._foreach_copy_(out, list(grads[:n]))
        return (None, None, *out, *_transposed(list(grads[n:]), torch.float32))


@contextlib.contextmanager
def half_adapters(model: torch.nn.Module, dtype: torch.dtype):
    """Within: the fused layers of ``model`` read their fp32 adapters through one bulk half-precision copy made
    on entry (A as it is, B transposed; differentiable, gradients come back fp32). A no-op when no fused layer
    has fp32 adapters."""
    layers = [(m, n) for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) in _FORWARDS
              for n in m.active_adapters if n in m.lora_A]
    a, b = ([p for m, n in layers for p in (getattr(m, d)[n].weight,) if p.dtype == torch.float32 and p.requires_grad]
            for d in ("lora_A", "lora_B"))
    if not a + b or dtype == torch.float32:
        yield
        return
    _HALF.update(zip(map(id, a + b), _HalfCopies.apply(dtype, len(a), *a, *b)))
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
    """(weight, bias, A, Bᵀ, scale) of a fused layer in ``dtype``; A and Bᵀ from the bulk copy when there is one."""
    base = layer.get_base_layer()
    bias = None if base.bias is None else base.bias.to(dtype)
    a, bt = (_HALF.get(id(w)) for w in (layer.lora_A[name].weight, layer.lora_B[name].weight))
    a = a if a is not None and a.dtype == dtype else layer.lora_A[name].weight.to(dtype)
    bt = bt if bt is not None and bt.dtype == dtype else layer.lora_B[name].weight.to(dtype).t()
    return base.weight.to(dtype), bias, a, bt, float(layer.scaling[name])


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
    """The first layer of a group (to_q, or a cross-attention's to_k): the group in one node; the others' outputs
    wait for their layers' calls on this same ``x``."""
    layers = (self, *_GROUPS.get(self, ()))
    name = _fusable(self, x, args, kwargs)
    if name is None or len(layers) == 1 or not all(
            _fusable(m, x, (), {}) == name and not m.get_base_layer().weight.requires_grad for m in layers):
        return _forward(self, x, *args, **kwargs)
    _PENDING.clear()  # a group whose siblings were never called (an error mid-forward) keeps nothing alive
    dtype = _compute_dtype(x)
    weights, biases, a, bt, scales = zip(*(_parts(m, name, dtype) for m in layers))
    with torch.autocast(x.device.type, enabled=False):
        outs = _LoraGroup.apply(x.to(dtype), scales, *weights, *biases, *a, *bt)
    for m, out in zip(layers[1:], outs[1:]):
        _PENDING[m] = (x, out)
    return outs[0]


def _forward_sibling(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A later layer of a group: the output its group computed on this very tensor, else its own fused forward."""
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
        group_qkv: also compute the projections of each attention that share their input in one node
            (:class:`_LoraGroup`): a self-attention's q, k and v, a cross-attention's k and v, when they are called
            on the same tensor, the first first (diffusers' attention processors); see :func:`grouped_attentions`.
    """
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    if group_qkv:
        for m in model.modules():
            cross = getattr(m, "is_cross_attention", None)  # diffusers' Attention only
            if cross is None:
                continue
            # the projections called on one tensor: q, k, v of self-attention; k, v of cross-attention (the text
            # states), whose 154-token adapter GEMMs are the step's least efficient (BENCHMARKS.md 2026-11-30 s6)
            group = [getattr(m, k, None) for k in (("to_k", "to_v") if cross else ("to_q", "to_k", "to_v"))]
            if all(isinstance(p, Linear) for p in group):
                _GROUPS[group[0]] = tuple(group[1:])
                group[0].forward = types.MethodType(_forward_grouped, group[0])
                for sibling in group[1:]:
                    sibling.forward = types.MethodType(_forward_sibling, sibling)
    return len(layers)


def grouped_attentions(model: torch.nn.Module) -> int:
    """How many of ``model``'s attentions compute their grouped projections in one node (self and cross)."""
    return sum(m in _GROUPS for m in model.modules())


def unfuse_lora_layers(model: torch.nn.Module) -> int:
    """Undo :func:`fuse_lora_layers` (peft's forward again). Returns the number of layers restored."""
    layers = [m for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) in _FORWARDS]
    for m in layers:
        del m.forward
        _GROUPS.pop(m, None)
        _PENDING.pop(m, None)
    return len(layers)
