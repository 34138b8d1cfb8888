"""plain_attention.py: SDXL's attentions without diffusers' division of their output by 1 give the same bits,
forward and backward, with one division fewer per attention; other layers and calls keep diffusers' processor."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth_pl.plain_attention import PlainAttention, qualifies, restore, use_plain_attention
from dreambooth_pl.zero_negative import ConstantNegative


class _Divisions(TorchDispatchMode):
    """Counts aten division calls."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_)
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def unet(tiny_base):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")


def _inputs(unet, rows: int = 2):
    g = torch.Generator().manual_seed(1)
    text = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    return dict(sample=torch.randn(rows, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(rows, 7, unet.config.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(rows, text, generator=g),
                                   "time_ids": torch.randn(rows, 6, generator=g)})


def _attentions(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def _run(unet, inputs):
    """The output, the gradients of the input and of every attention projection, and the divisions it took."""
    unet.zero_grad(set_to_none=True)
    x = inputs["sample"].clone().requires_grad_(True)
    with _Divisions() as count:
        out = unet(**{**inputs, "sample": x}).sample
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = [p.grad.clone() for a in _attentions(unet) for p in a.parameters()]
    return out.detach(), x.grad, grads, count.n


def test_the_same_bits_forward_and_backward_with_a_division_fewer_each_way_per_attention(unet):
    """fp32 on the CPU: the same kernels bar x / 1, which IEEE makes exact, so equality is bitwise."""
    inputs = _inputs(unet)
    want = _run(unet, inputs)
    layers = len(_attentions(unet))
    assert use_plain_attention(unet) == layers > 0
    got = _run(unet, inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(got[2]) == len(want[2]) and all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    assert want[3] - got[3] == 2 * layers  # the output's division and its gradient's
    assert restore(unet) == layers and restore(unet) == 0
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert torch.equal(_run(unet, inputs)[0], want[0])


@pytest.mark.parametrize("change", ["rescale_output_factor", "residual_connection"])
def test_a_layer_that_rescales_or_adds_its_input_keeps_diffusers_processor(unet, change):
    attn = _attentions(unet)[0]
    setattr(attn, change, 2.0 if change == "rescale_output_factor" else True)
    assert not qualifies(attn)
    use_plain_attention(unet)
    assert not isinstance(attn.processor, PlainAttention)
    assert all(isinstance(a.processor, PlainAttention) for a in _attentions(unet)[1:])


@torch.no_grad()
def test_a_masked_or_4d_call_goes_to_the_layers_own_processor(unet):
    attn = next(a for a in _attentions(unet) if not a.is_cross_attention)
    original = attn.processor
    use_plain_attention(unet)
    hidden = torch.randn(2, 16, attn.query_dim)
    mask = torch.zeros(2, 16)
    mask[:, -3:] = -1e4
    assert torch.equal(attn(hidden, attention_mask=mask), original(attn, hidden, attention_mask=mask))
    image = torch.randn(2, attn.query_dim, 4, 4)  # diffusers flattens a 4-D input itself
    assert attn.processor(attn, image).shape == image.shape
    assert torch.equal(attn.processor(attn, image), original(attn, image))


@torch.no_grad()
def test_the_constant_negative_still_takes_the_cross_attentions(unet):
    use_plain_attention(unet)
    cross = [a for a in _attentions(unet) if a.is_cross_attention]
    constant = ConstantNegative(unet)
    try:
        assert constant.layers == len(cross) > 0
    finally:
        constant.remove()
    assert all(isinstance(a.processor, PlainAttention) for a in cross)
