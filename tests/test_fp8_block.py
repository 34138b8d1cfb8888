"""fp8_block.py: the fused float8 blocks give the unfused float8 UNet's output bit for bit on the CPU (the formula
path), guided with the constant negative too; every case outside the plain one runs diffusers' forward; the
sampler's switch; the producers' Triton kernels under the interpreter (sums, scales) and on a GPU (codes)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted
from dreambooth_pl import fp8_block, fp8_gemm
from dreambooth_pl.fp8_gemm import Fp8Rows, quantize_rows_reference


def float8_unet(tiny_base):
    from diffusers import UNet2DConditionModel

    from dreambooth_pl.block_ops import fuse_geglu
    from dreambooth_pl.plain_attention import use_plain_attention
    from dreambooth_pl.zero_negative import ConstantNegative

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").requires_grad_(False).eval()
    # as the prior sampler sets it up: the GEGLU's halves as two GEMMs, plain attention, float8
    assert fuse_geglu(unet) > 0 and fp8_gemm.to_fp8(unet) > 0 and use_plain_attention(unet) > 0
    return unet, ConstantNegative(unet)


def guided_inputs(unet):
    """A guided batch of 2 x 2: the first two rows the zeroed negative prompt's, as the prior sampler draws."""
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(4, 5, cfg.cross_attention_dim, generator=g)
    text[:2] = 0
    added = {"text_embeds": torch.randn(4, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                        generator=g), "time_ids": torch.zeros(4, 6)}
    return x, torch.tensor(10), text, added


def test_fused_blocks_are_the_unfused_float8_unet_bit_for_bit(tiny_base, monkeypatch):
    unet, constant = float8_unet(tiny_base)
    x, t, text, added = guided_inputs(unet)
    calls = []
    real = fp8_gemm.quantize_rows
    monkeypatch.setattr(fp8_gemm, "quantize_rows", lambda v: calls.append(v.shape[-1]) or real(v))
    with torch.no_grad(), constant.zero_rows(2):
        unfused = unet(x, t, text, added_cond_kwargs=added).sample
        n_unfused = len(calls)
        blocks = fp8_block.fuse(unet)
        assert blocks == sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules()) > 0
        calls.clear()
        fused = unet(x, t, text, added_cond_kwargs=added).sample
    assert torch.equal(fused, unfused)
    # what is still quantized apart: each block's attention outputs (2) and text states (1), each transformer's
    # proj_in and proj_out; the norms' and the GEGLU's codes (4 a block) came from their producers
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    assert len(calls) == 3 * blocks + 2 * transformers and n_unfused == len(calls) + 4 * blocks
    assert fp8_block.unfuse(unet) == blocks and fp8_block.fuse(unet) == blocks  # and again


def test_every_case_outside_the_plain_one_runs_diffusers_forward(tiny_base, monkeypatch):
    unet, constant = float8_unet(tiny_base)
    fp8_block.fuse(unet)
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    ran = []
    monkeypatch.setattr(type(block), "forward", lambda self, *a, **k: ran.append(1) or a[0])
    h = torch.randn(2, 16, block.norm1.normalized_shape[0])
    text = torch.randn(2, 5, block.attn2.to_k.in_features)
    with torch.no_grad():
        block(h, encoder_hidden_states=text)
        assert not ran  # the plain case: the fused forward
        block(h, encoder_hidden_states=text, cross_attention_kwargs={"scale": 1.0})
        block(h, encoder_hidden_states=text, attention_mask=torch.ones(2, 16))
        block(h)  # no text states
        block.train()
        block(h, encoder_hidden_states=text)
        block.eval()
    block(h.requires_grad_(), encoder_hidden_states=text)  # gradients: the float8 layers have none
    constant.remove()
    fp8_gemm.restore(unet)  # half-precision layers back under the patch
    with torch.no_grad():
        block(h.detach(), encoder_hidden_states=text)
    assert len(ran) == 6
    assert fp8_block.unfuse(unet) > 0 and "forward" not in vars(block)


def test_rows_slice_their_leading_dimension_and_dequantize():
    x = torch.randn(4, 3, 32)
    rows = Fp8Rows(*quantize_rows_reference(x.reshape(-1, 32)), x.shape, x.dtype)
    tail = rows[2:]
    assert tail.shape == (2, 3, 32) and tail.ndim == 3 and torch.equal(tail.q.view(torch.uint8), rows.q[6:].view(torch.uint8))
    torch.testing.assert_close(tail.dequantize(), x[2:], rtol=0.07, atol=0)  # e4m3 rounding
    assert rows[5:].shape[0] == 0
    with pytest.raises(TypeError, match="step-1 slice"):
        rows[::2]


def test_the_sampler_fuses_the_float8_blocks_and_draws_the_same_latents(tiny_base):
    from dreambooth_pl.prior_sampler import PriorSampler

    def draw(**kw):  # (the GEGLU's halves as two GEMMs in both: on a CPU it is off by default, and the whole
        # projection's GEMM sums in another order than its halves')
        s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2, fp8_gemms=True, fused_geglu=True, **kw)
        return s, s.latents("a photo of dog", [3, 4], 2, 5.0, None, 64, 64)

    fused, a = draw()
    unfused, b = draw(fp8_fused_blocks=False)
    assert fused.runtime()["fp8_fused_blocks"] > 0 and unfused.runtime()["fp8_fused_blocks"] == 0
    assert torch.equal(a, b)
    plain = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2)
    assert plain.runtime()["fp8_fused_blocks"] == 0  # half precision: nothing to fuse


def _steps(q, qr):
    return (q.view(torch.uint8).int() - qr.view(torch.uint8).int()).abs()


def assert_mostly_the_reference_codes(q, y):
    """The interpreter's e4m3 conversion (numpy has none) rounds a value just under a power of two down a whole
    binade (127.3 to 64 where a GPU and PyTorch give 128), ~2 % of random codes: the rest must be the reference's."""
    same = q.view(torch.uint8) == quantize_rows_reference(y)[0].view(torch.uint8)
    assert same.float().mean() >= 0.95


def test_producer_kernels_on_the_interpreter(monkeypatch):
    """The sums, the scales and most codes under the interpreter (its own e4m3 rounding is wrong at binade tops);
    every code on a GPU (below)."""
    mod = interpreted(monkeypatch, "fp8_quant_kernel")
    torch.manual_seed(0)
    for k, dtype in ((640, torch.float16), (320, torch.float32)):
        norm = torch.nn.LayerNorm(k).to(dtype)
        torch.nn.init.normal_(norm.weight, 1, 0.2), torch.nn.init.normal_(norm.bias, 0, 0.2)
        x, r = (torch.randn(19, k, dtype=dtype) * 3 for _ in range(2))
        for residual in (None, r):
            h, q, s = mod.layer_norm_rows(x, residual, norm.weight, norm.bias, norm.eps)
            ref_h = x if residual is None else x + residual
            assert (h is None) == (residual is None) and (h is None or torch.equal(h, ref_h))
            y = F.layer_norm(ref_h, (k,), norm.weight, norm.bias, norm.eps)
            torch.testing.assert_close(s, quantize_rows_reference(y)[1], rtol=1e-3, atol=0)  # (a sum's order)
            assert_mostly_the_reference_codes(q, y)
        a, g = (torch.randn(7, 2 * k, dtype=dtype) for _ in range(2))
        q, s = mod.gated_gelu_rows(a, g)
        y = a * F.gelu(g)
        torch.testing.assert_close(s, quantize_rows_reference(y)[1], rtol=1e-3, atol=0)
        assert_mostly_the_reference_codes(q, y)


@pytest.mark.gpu
def test_producer_kernels_and_the_fused_unet_on_gpu(tiny_base):
    if not torch.cuda.is_available() or not fp8_gemm.supported(torch.device("cuda")):
        pytest.skip("needs a CUDA GPU with float8 tensor cores")
    from dreambooth_pl import fp8_quant_kernel, geglu_kernel

    torch.manual_seed(0)
    for k in (640, 1280):
        norm = torch.nn.LayerNorm(k, device="cuda", dtype=torch.float16)
        torch.nn.init.normal_(norm.weight, 1, 0.2), torch.nn.init.normal_(norm.bias, 0, 0.2)
        x, r = (torch.randn(4096, k, device="cuda", dtype=torch.float16) * 3 for _ in range(2))
        h, q, s = fp8_quant_kernel.layer_norm_rows(x, r, norm.weight, norm.bias, norm.eps)
        assert torch.equal(h, x + r)
        qr, sr = quantize_rows_reference(norm(x + r))
        torch.testing.assert_close(s, sr, rtol=1e-3, atol=0)
        # codes: PyTorch's LayerNorm sums in another order, so a row's amax may differ by an fp16 ulp: then its
        # codes may move a step where the scaled value sits at a rounding boundary
        assert _steps(q, qr).max() <= 1 and (_steps(q, qr) > 0).float().mean() <= 1e-3
        a, g = (torch.randn(4096, 4 * k, device="cuda", dtype=torch.float16) for _ in range(2))
        q, s = fp8_quant_kernel.gated_gelu_rows(a, g)
        qr, sr = quantize_rows_reference(geglu_kernel.forward(a, g))  # (one rounding, as the unfused draw's)
        torch.testing.assert_close(s, sr, rtol=1e-3, atol=0)
        assert _steps(q, qr).max() <= 1 and (_steps(q, qr) > 0).float().mean() <= 1e-3
    unet, constant = float8_unet(tiny_base)
    unet.to("cuda", torch.float16)
    args = [v.to("cuda", torch.float16) if v.is_floating_point() else v.cuda()
            for v in guided_inputs(unet)[:3]]
    added = {k: v.to("cuda", torch.float16) for k, v in guided_inputs(unet)[3].items()}
    with torch.no_grad(), constant.zero_rows(2):
        unfused = unet(*args, added_cond_kwargs=added).sample.float()
        fp8_block.fuse(unet)
        fused = unet(*args, added_cond_kwargs=added).sample.float()
    assert ((fused - unfused).norm() / unfused.norm()).item() < 1e-2  # the same codes but at rounding boundaries
