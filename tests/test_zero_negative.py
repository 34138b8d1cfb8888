"""zero_negative.py: with SDXL's zeroed negative prompt, the negative rows' cross-attentions are their output bias, so
filling that constant in gives the UNet's output while those layers compute half the batch."""
from __future__ import annotations

import pytest
import torch

from dreambooth_pl.prior_sampler import PriorSampler
from dreambooth_pl.zero_negative import ConstantNegative, constant_for_zero_context

SIZE, STEPS, ROWS = 64, 3, 2


@pytest.fixture(scope="module")
def unet(tiny_base):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    u = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    for m in u.modules():  # non-zero output biases, so the constant is not the zero a fresh layer might give
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, std=0.1)
    return u


def _inputs(unet, negative_zero: bool):
    g = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim
    text = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    embeds = torch.randn(2 * ROWS, 7, dim, generator=g)
    if negative_zero:
        embeds[:ROWS] = 0
    return dict(sample=torch.randn(2 * ROWS, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": torch.randn(2 * ROWS, text, generator=g),
                                   "time_ids": torch.randn(2 * ROWS, 6, generator=g)})


def _attn2(unet):
    return [m for n, m in unet.named_modules() if n.endswith("attn2")]


@torch.no_grad()
def test_the_constant_gives_the_unets_output_and_its_cross_attentions_compute_the_positive_rows_only(unet):
    """fp32 on the CPU: the same output within float rounding; every cross-attention's query projection sees the
    positive rows alone while the rows are set, the whole batch outside."""
    inputs = _inputs(unet, negative_zero=True)
    want = unet(**inputs).sample
    seen = []
    hooks = [m.to_q.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0])) for m in _attn2(unet)]
    constant = ConstantNegative(unet)
    try:
        assert constant.layers == len(_attn2(unet)) > 0
        with constant.zero_rows(ROWS):
            got = unet(**inputs).sample
        assert seen and set(seen) == {ROWS}
        seen.clear()
        assert torch.allclose(unet(**inputs).sample, want, rtol=0, atol=1e-6)  # rows unset: computed
        assert set(seen) == {2 * ROWS}
    finally:
        constant.remove()
        for h in hooks:
            h.remove()
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()


@torch.no_grad()
def test_a_nonzero_negative_is_not_the_constant(unet):
    """The constant is only right for zero embeddings: with real negative rows the output moves (the sampler sets the
    rows only where it found the negative embeddings all zero)."""
    inputs = _inputs(unet, negative_zero=False)
    want = unet(**inputs).sample
    constant = ConstantNegative(unet)
    try:
        with constant.zero_rows(ROWS):
            got = unet(**inputs).sample
    finally:
        constant.remove()
    assert (got[:ROWS] - want[:ROWS]).abs().max() > 1e-3 and torch.allclose(got[ROWS:], want[ROWS:], atol=1e-5)


def test_layers_the_constant_does_not_hold_for_keep_their_processor(unet):
    """Self-attention, a cross-attention whose value projection has a bias (v = bias ≠ 0), one normalising its
    encoder states (LayerNorm(0) = its shift), one through another processor, and a peft LoRA with its own bias are
    left alone; :meth:`ConstantNegative.remove` gives every layer its processor back."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    class Other(AttnProcessor2_0):  # e.g. an IP-adapter's: extra keys and values the rule knows nothing of
        pass

    attn1 = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    assert attn1 and not any(constant_for_zero_context(m) for m in attn1)
    kw = dict(cross_attention_dim=4, heads=2, dim_head=4)
    plain, biased = Attention(8, **kw), Attention(8, bias=True, **kw)
    normed, other = Attention(8, cross_attention_norm="layer_norm", **kw), Attention(8, processor=Other(), **kw)
    assert constant_for_zero_context(plain)
    assert not any(constant_for_zero_context(m) for m in (biased, normed, other))
    from peft import LoraConfig, inject_adapter_in_model

    with_bias = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_v"], lora_bias=True),
                                        torch.nn.Sequential(Attention(8, **kw)))[0]
    lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_v", "to_out.0"]),
                                   torch.nn.Sequential(Attention(8, **kw)))[0]
    assert constant_for_zero_context(lora) and not constant_for_zero_context(with_bias)
    before = {m: m.processor for m in unet.modules() if isinstance(m, Attention)}
    ConstantNegative(unet).remove()
    assert all(m.processor is p for m, p in before.items())


def test_the_sampler_uses_it_for_the_zeroed_negative_only_and_draws_the_same_latents(tiny_base):
    """``constant_negative`` (the default) draws the computed latents within fp32 rounding without a negative
    prompt; a negative prompt computes every row; ``leave_base`` hands on the plain processors."""
    on = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3)
    off = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3, constant_negative=False)
    assert on.runtime()["constant_negative_layers"] == len(_attn2(on.pipe.unet)) > 0
    assert off.runtime()["constant_negative_layers"] == 0
    rows = []
    for m in _attn2(on.pipe.unet):
        m.to_q.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    a = on.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    b = off.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    assert set(rows) == {2} and (a - b).abs().max().item() < 1e-5 * b.abs().max().item()
    rows.clear()
    on.latents("a photo of dog", [5, 6], STEPS, 5.0, "blurry", SIZE, SIZE)
    assert set(rows) == {4}
    from dreambooth_pl import base_handoff

    unet = on.pipe.unet
    try:
        assert on.leave_base()
    finally:
        base_handoff.release()
    assert {type(m.processor).__name__ for m in _attn2(unet)} == {"AttnProcessor2_0"}


@pytest.mark.parametrize("out_bias", [True, False])
@torch.no_grad()
def test_one_cross_attention_with_and_without_an_output_bias(out_bias):
    """The layer's own output for zero encoder states is what is put in (its bias, or zeros), while its query
    projection sees the positive rows only."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(8, cross_attention_dim=4, heads=2, dim_head=4, out_bias=out_bias).eval()
    if out_bias:
        torch.nn.init.normal_(attn.to_out[0].bias)
    h, enc = torch.randn(4, 5, 8), torch.randn(4, 3, 4)
    enc[:2] = 0
    want = attn(h, enc)
    rows = []
    attn.to_q.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    constant = ConstantNegative(torch.nn.Sequential(attn))
    try:
        assert constant.layers == 1
        with constant.zero_rows(2):
            got = attn(h, enc)
    finally:
        constant.remove()
    assert rows == [2] and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[:2], (attn.to_out[0].bias if out_bias else torch.zeros(8)).expand(2, 5, 8))
