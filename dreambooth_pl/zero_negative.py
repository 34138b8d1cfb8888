"""Classifier-free guidance with SDXL's zeroed negative prompt: its cross-attention is a constant, not computed.

Without a negative prompt, SDXL's pipeline guides with all-zero text embeddings (``force_zeros_for_empty_prompt``,
the base's default; ``StableDiffusionXLPipeline.encode_prompt``). A cross-attention whose value projection has no
bias (SDXL's) then sees v = 0: softmax(q kᵀ) v = 0 for every query, since softmax weights sum to one, and the layer
returns ``to_out(0)``, its output bias, whatever the image. :class:`ConstantNegative` computes each such layer on
the guided batch's positive rows only and fills the negative rows with that constant, so every ``attn2``'s
projections and attention kernel run over half the batch. At 1024² its query and output projections are
4·d²·tokens FLOPs per block (10 blocks at d = 640 over 4096 tokens, 60 at d = 1280 over 1024): 0.47 TFLOP per image
forward, half of it skipped in each guided step's two forwards (13.5 TFLOP per image, BENCHMARKS.md 2026-12-05):
~3.5 %. The images are the same within fp16 rounding (the GEMMs see another row count).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# processors whose output for zero keys and values is to_out(0): the plain ones, fused projections included
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "PlainAttention")


def constant_for_zero_context(attn) -> bool:
    """Whether this diffusers ``Attention`` returns ``to_out(0)``, its output bias, for all-zero encoder states.

    It must be a cross-attention through a plain processor whose key/value projections add no bias (peft's
    ``lora_bias`` included), with no norm on the encoder states, no added key/value projections, no residual,
    rescale or spatial/group norm, and an output projection whose own ``bias`` is the constant (``nn.Linear``,
    peft's wrappers, the quantized layers; a ``lora_bias`` there adds to it).
    """
    if not getattr(attn, "is_cross_attention", False) or type(attn.processor).__name__ not in PLAIN_PROCESSORS:
        return False
    # fused projections may have replaced to_k and to_v by to_kv; a layer that keeps no ``bias`` is not guessed at
    projections = [p for p in (getattr(attn, n, None) for n in ("to_k", "to_v", "to_kv")) if p is not None]
    if not projections or any(getattr(p, "bias", 0) is not None or _lora_bias(p) for p in projections):
        return False
    if not hasattr(attn.to_out[0], "bias") or _lora_bias(attn.to_out[0]):
        return False
    return (getattr(attn, "norm_cross", None) is None and getattr(attn, "add_k_proj", None) is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and attn.spatial_norm is None and attn.group_norm is None)


def _lora_bias(layer) -> bool:
    """A peft adapter on ``layer`` with its own bias (``lora_bias``: its B projection adds one)."""
    return any(bool(v) for v in (getattr(layer, "lora_bias", None) or {}).values())


def is_zero(t: torch.Tensor) -> bool:
    """Every element is 0 (one host sync)."""
    return not bool(t.any())


def unwrapped(processor):
    """The processor :class:`ConstantNegative` wraps, or ``processor`` itself where it wraps none."""
    return processor.inner if isinstance(processor, _Processor) else processor


class _Processor:
    """The wrapped processor on the rows after :attr:`ConstantNegative.rows`; the output bias on the rows before."""

    def __init__(self, owner: "ConstantNegative", inner):
        self.owner, self.inner = owner, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        rows = self.owner.rows
        # only a guided batch, [negatives; positives] of equal halves: anything else is computed as given
        if (not rows or encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3
                or hidden_states.shape[0] != 2 * rows):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        cond = self.inner(attn, hidden_states[rows:], encoder_hidden_states[rows:], None, temb, *args, **kwargs)
        # read here, not kept: it follows the layer's moves; a CUDA-graph capture records a read of its memory
        bias = attn.to_out[0].bias  # to_out[1] is dropout: the identity in inference
        constant = bias.to(cond.dtype) if bias is not None else cond.new_zeros(cond.shape[2])
        return torch.cat([constant.expand(rows, cond.shape[1], cond.shape[2]), cond])


class ConstantNegative:
    """Puts the output bias in for the zeroed negative rows of a UNet's qualifying cross-attentions while
    :meth:`zero_rows` says how many leading rows of a guided batch are zero (0: every row computed, as diffusers).

    Args:
        unet: the diffusers UNet (or any module holding diffusers ``Attention`` layers).
    """

    def __init__(self, unet: torch.nn.Module):
        from diffusers.models.attention_processor import Attention

        self.rows = 0
        self._inner: dict[torch.nn.Module, object] = {}
        for m in unet.modules():
            if isinstance(m, Attention) and constant_for_zero_context(m):
                self._inner[m] = m.processor
                m.set_processor(_Processor(self, m.processor))

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
