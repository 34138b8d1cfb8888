"""SDXL's attentions through diffusers' ``AttnProcessor2_0`` less the passes that change nothing.

diffusers' processor ends every attention with ``hidden_states / attn.rescale_output_factor``, a full read and write
of the attention's output even where the factor is 1 (every attention of SDXL's UNet: 140 per forward, and as many
for the gradient in training). x / 1 is x exactly in IEEE arithmetic, so :class:`PlainAttention` skips that pass and
otherwise calls what diffusers' processor calls, in its order (q, then k, then v, which fused_lora.py's q/k/v
grouping relies on): outputs and gradients are the same bits. It takes only the plain case (3-D inputs, no mask, no
spatial, group, cross or q/k norms, no residual, a factor of 1); any other call goes to the layer's own processor.
The prior sampler draws with it and training runs with it; :func:`restore` gives the layers their processors back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qualifies(attn) -> bool:
    """Whether this diffusers ``Attention`` runs diffusers' ``AttnProcessor2_0`` on a plain layer, whose output
    :class:`PlainAttention` reproduces without the division by its ``rescale_output_factor`` of 1."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (type(attn.processor) is AttnProcessor2_0 and attn.rescale_output_factor == 1.0
            and not attn.residual_connection and attn.spatial_norm is None and attn.group_norm is None
            and attn.norm_cross is None and getattr(attn, "norm_q", None) is None
            and getattr(attn, "norm_k", None) is None and getattr(attn, "add_k_proj", None) is None)


class PlainAttention:
    """``AttnProcessor2_0`` for a layer that :func:`qualifies`, without its division by 1.

    Args:
        original: the layer's own processor: it takes every call outside the plain case, and :func:`restore` puts
            it back.
    """

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or hidden_states.ndim != 3 or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        b, heads = hidden_states.shape[0], attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))  # [1] is dropout


def use_plain_attention(model: torch.nn.Module) -> int:
    """Give every qualifying attention of ``model`` a :class:`PlainAttention`. Returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention) and qualifies(m)]
    for m in layers:
        m.set_processor(PlainAttention(m.processor))
    return len(layers)


def restore(model: torch.nn.Module) -> int:
    """Undo :func:`use_plain_attention`. Returns how many layers got their processor back."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "processor", None), PlainAttention)]
    for m in layers:
        m.set_processor(m.processor.original)
    return len(layers)
