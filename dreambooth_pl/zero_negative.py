"""Classifier-free guidance with SDXL's zeroed negative prompt: its cross-attention is a constant, not computed.

Without a negative prompt, SDXL's pipeline guides with all-zero text embeddings (``force_zeros_for_empty_prompt``,
the base's default; ``StableDiffusionXLPipeline.encode_prompt``). A cross-attention whose key and value projections
have no bias (SDXL's) then sees k = v = 0: softmax(q kᵀ) v = 0 for every query, and the layer returns
``to_out(0)``, its output bias, whatever the image. :class:`ConstantNegative` computes each such layer on the
guided batch's positive rows only and fills the negative rows with that constant, so the query and output
projections and the attention kernel of every ``attn2`` run over half the batch. At 1024² those projections are
4·d²·tokens FLOPs per block (10 blocks at d = 640 over 4096 tokens, 60 at d = 1280 over 1024): 0.47 TFLOP of the
6.76 an SDXL UNet forward takes per image (BENCHMARKS.md, 2026-12-05), so ~3.5 % of a guided step. The images are the same within fp16 rounding (the GEMMs see another row count).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# processors whose output for zero keys and values is to_out(0): the plain ones, fused projections included
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0")


def constant_for_zero_context(attn) -> bool:
    """Whether this diffusers ``Attention`` returns ``to_out(0)`` for all-zero encoder states: a cross-attention
    through a plain processor, no bias on its key/value projections, no norm on the encoder states, no added
    key/value projections, no residual, rescale or spatial/group norm, and an output projection whose ``bias``
    (the constant) can be read: ``nn.Linear``, peft's wrappers, the quantized layers."""
    if not getattr(attn, "is_cross_attention", False) or type(attn.processor).__name__ not in PLAIN_PROCESSORS:
        return False
    # each projection must say it has no bias (a layer that keeps no ``bias`` attribute is not guessed at)
    # (fused projections may have replaced to_k and to_v by to_kv)
    projections = [p for p in (getattr(attn, n, None) for n in ("to_k", "to_v", "to_kv")) if p is not None]
    if not projections or any(getattr(p, "bias", 0) is not None for p in projections) \
            or not hasattr(attn.to_out[0], "bias"):
        return False
    return (getattr(attn, "norm_cross", None) is None and getattr(attn, "add_k_proj", None) is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and attn.spatial_norm is None and attn.group_norm is None)


def is_zero(t: torch.Tensor) -> bool:
    """Every element is 0 (one host sync)."""
    return not bool(t.any())


def _zeros_like_layer(module: torch.nn.Module, n: int) -> torch.Tensor:
    """``n`` zeros in the dtype and on the device of ``module``'s first floating-point parameter."""
    ref = next((p for p in module.parameters() if p.is_floating_point()), torch.empty(0))
    return torch.zeros(n, dtype=ref.dtype, device=ref.device)


class _Processor:
    """The wrapped processor on the rows after :attr:`ConstantNegative.rows`; the constant on the rows before."""

    def __init__(self, owner: "ConstantNegative", inner, constant: torch.Tensor):
        self.owner, self.inner, self.constant = owner, inner, constant

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        rows = self.owner.rows
        if (not rows or encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3
                or not 0 < rows < hidden_states.shape[0]):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        cond = self.inner(attn, hidden_states[rows:], encoder_hidden_states[rows:], None, temb, *args, **kwargs)
        constant = self.constant.to(cond.dtype).expand(rows, cond.shape[1], cond.shape[2])
        return torch.cat([constant, cond])


class ConstantNegative:
    """Puts the constant in for the zeroed negative rows of a UNet's qualifying cross-attentions while
    :meth:`zero_rows` says how many leading rows are zero (0: every row computed, as diffusers does).

    Each constant is the output projection's bias itself (what any linear layer, a quantized one too, returns for
    a zero input), so it exists before a CUDA-graph capture reads it and follows the layer.

    Args:
        unet: the diffusers UNet, on its device and in its dtype.
    """

    def __init__(self, unet: torch.nn.Module):
        from diffusers.models.attention_processor import Attention

        self.rows = 0
        self._inner: dict[torch.nn.Module, object] = {}
        for m in unet.modules():
            if isinstance(m, Attention) and constant_for_zero_context(m):
                bias = getattr(m.to_out[0], "bias", None)  # to_out[1] is dropout: the identity in inference
                constant = bias.detach() if bias is not None else _zeros_like_layer(m, m.out_dim)
                self._inner[m] = m.processor
                m.set_processor(_Processor(self, m.processor, constant.view(1, 1, -1)))

    @property
    def layers(self) -> int:
        """How many cross-attentions take the constant."""
        return len(self._inner)

    @contextlib.contextmanager
    def zero_rows(self, rows: int) -> Iterator[None]:
        """The first ``rows`` rows of every batch are the zeroed negative prompt's while inside (0: none)."""
        before, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = before

    def remove(self) -> None:
        """Give each cross-attention its own processor back."""
        for m, inner in self._inner.items():
            m.set_processor(inner)
        self._inner.clear()
