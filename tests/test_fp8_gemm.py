"""fp8_gemm.py: float8 linears against their exact dequantized maths, the shared input quantization, the swap and
its undoing, the prior sampler's switch and key; the Triton quantization under the interpreter (scales) and on a
GPU (codes, equal but at rounding ties)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted
from dreambooth_pl import fp8_gemm
from dreambooth_pl.fp8_gemm import Fp8Linear, quantize_rows_reference


def dequantized(q, s):
    return q.float() * s


def test_rows_quantize_within_e4m3_rounding_and_zero_rows_stay_zero():
    torch.manual_seed(0)
    x = torch.randn(33, 64) * torch.logspace(-3, 3, 33)[:, None]  # rows six decades apart: per-row scales
    x[5] = 0
    q, s = quantize_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (33, 1)
    assert torch.equal(q[5].float(), torch.zeros(64)) and torch.isfinite(s).all()
    err = (dequantized(q, s) - x).abs() / x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    assert err.max() <= 16 / 448 * 1.0001  # half of e4m3's step in its top binade [256, 448] (32), per row amax
    assert torch.equal(q.float().abs().amax(dim=1)[torch.arange(33) != 5], torch.full((32,), 448.0))


@pytest.mark.parametrize("bias", [True, False])
def test_the_float8_layer_is_its_dequantized_product(bias):
    """The scaled GEMM computes diag(s_x) Q_x (diag(s_w) Q_w)ᵀ + b: fp32 maths on the dequantized codes, to fp32
    rounding; and within e4m3's rounding of the fp32 layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias).requires_grad_(False)
    layer = Fp8Linear(lin)
    x = torch.randn(2, 7, 64)
    out = layer(x)
    qx, sx = quantize_rows_reference(x.reshape(-1, 64))
    exact = F.linear(dequantized(qx, sx), dequantized(layer.qweight, layer.wscale.t()), lin.bias).reshape(2, 7, 48)
    assert out.shape == (2, 7, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    ref = lin(x)
    assert (out - ref).norm() / ref.norm() < 0.06  # two e4m3 roundings (~2⁻⁴ relative each at worst)
    assert layer.bias is lin.bias and layer.weight is lin.weight


def test_halves_are_the_two_row_blocks_from_one_quantization(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 64).requires_grad_(False)
    layer = Fp8Linear(lin)
    calls = []
    real = fp8_gemm.quantize_rows
    monkeypatch.setattr(fp8_gemm, "quantize_rows", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(5, 32)
    a, g = layer.halves(x)
    assert len(calls) == 1
    whole = layer(x)  # one reader: nothing was kept, so it quantizes again
    assert len(calls) == 2 and layer.shared._value is None
    torch.testing.assert_close(torch.cat([a, g], -1), whole, rtol=1e-6, atol=1e-6)


def test_projections_of_one_input_share_its_quantization_until_it_changes(monkeypatch):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).requires_grad_(False)
    region = torch.nn.Module()  # to_fp8 finds the UNet's regions by class name: here, a plain Module
    region.attn = attn
    monkeypatch.setattr(fp8_gemm, "REGIONS", ("Module",))
    assert fp8_gemm.to_fp8(region) == 4  # q, k, v and the output projection
    assert attn.to_q.shared is attn.to_k.shared is attn.to_v.shared and attn.to_out[0].shared is not attn.to_q.shared
    calls = []
    real = fp8_gemm.quantize_rows
    monkeypatch.setattr(fp8_gemm, "quantize_rows", lambda x: calls.append(1) or real(x))
    x = torch.randn(2, 6, 32)
    q1, k1 = attn.to_q(x), attn.to_k(x)
    assert len(calls) == 1
    x.mul_(2)  # changed in place: quantized again
    assert torch.allclose(attn.to_v(x), 2 * attn.to_v(x / 2), rtol=1e-6, atol=1e-6) and len(calls) == 3
    y = torch.randn(2, 6, 32)
    attn.to_q(y), attn.to_k(y), attn.to_v(y)
    assert len(calls) == 4 and attn.to_q.shared._value is None  # dropped after its third reader: nothing held
    assert attn.to_out[0].shared.readers == 1
    assert fp8_gemm.restore(region) == 4 and type(attn.to_q) is torch.nn.Linear


def test_unet_swap_covers_the_transformers_and_restores_the_same_layers(tiny_base, monkeypatch):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").requires_grad_(False)
    before = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    changed = fp8_gemm.to_fp8(unet)
    wrapped = {n for n, m in unet.named_modules() if isinstance(m, Fp8Linear)}
    assert changed == len(wrapped) > 0
    assert all(".transformer_blocks." in n or n.endswith(("proj_in", "proj_out")) for n in wrapped)
    assert not any(n.startswith(("time_embedding", "add_embedding")) for n in wrapped)  # 16-row GEMMs stay
    # the same text states object in two calls: each call quantizes them again (a CUDA graph captured in the second
    # call must record its own quantization, since a replay refills the states without Python seeing it)
    calls = []
    real = fp8_gemm.quantize_rows
    monkeypatch.setattr(fp8_gemm, "quantize_rows", lambda x: calls.append(1) or real(x))
    cfg = unet.config
    x, t = torch.randn(1, cfg.in_channels, 8, 8), torch.tensor(10)
    text = torch.randn(1, 5, cfg.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim),
             "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        first = unet(x, t, text, added_cond_kwargs=added).sample
        n = len(calls)
        second = unet(x, t, text, added_cond_kwargs=added).sample
    assert n > 0 and len(calls) == 2 * n and torch.equal(first, second)
    assert n < changed  # self-attention's q, k, v and cross-attention's k, v quantize their input once
    assert fp8_gemm.restore(unet) == changed
    after = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_sampler_switch_draws_near_images_and_leaves_a_plain_base(tiny_base):
    import numpy as np

    from dreambooth_pl.prior_sampler import PriorSampler

    def draw(**kw):
        s = PriorSampler(tiny_base, "euler", batch_size=2, **kw)
        return s, np.stack([np.asarray(i, np.float32) for _, i in s.images("a dog", [0, 1], 4, 5.0, None, 64, 64)])

    _, half = draw()
    s, eight = draw(fp8_gemms=True)
    layers = s.runtime()["fp8_gemm_layers"]
    assert layers > 0
    diff = np.abs(half - eight).mean()
    assert 0 < diff < 8  # uint8 levels: other rounding, the same picture (2.0 on the tiny random base)
    from dreambooth_pl import base_handoff

    try:
        assert s.leave_base()
        unet = [m for k, m in base_handoff._left.items() if "unet" in k][0]
        assert not any(isinstance(m, Fp8Linear) for m in unet.modules())  # training takes the plain layers
        from dreambooth_pl import fp8_block

        assert s.speedups.fp8_fused_blocks > 0  # and its fused float8 blocks were undone with them
        assert fp8_block.unfuse(unet) == 0 and not any("forward" in vars(m) for m in unet.modules())
    finally:
        base_handoff.release()
    parked = PriorSampler(tiny_base, "euler", batch_size=2, fp8_gemms=True, park_text_encoders=True)
    assert parked.runtime()["fp8_gemm_layers"] == layers  # (its load keeps gradients on)


def test_class_image_settings_key_float8_draws(tmp_path):
    from dreambooth_pl.data.class_images import ClassImageSettings, draws_fp8
    from dreambooth_pl.data.prior_cache import prior_key

    assert draws_fp8(ClassImageSettings(fp8_gemms=True), torch.device("cpu"))
    assert not draws_fp8(ClassImageSettings(fp8_gemms=True, base_dtype="nf4"), torch.device("cpu"))
    args = (str(tmp_path), None, "a dog", None, "euler", 25, 5.0, 64, 64)
    assert prior_key(*args, fp8_gemms=True)["fp8_gemms"] is True and "fp8_gemms" not in prior_key(*args)


def test_triton_quantization_gives_the_reference_scales_on_the_interpreter(monkeypatch):
    """The interpreter runs the kernel on the CPU; its own float8 conversion rounds unlike the GPU's (numpy has no
    e4m3), so the codes are compared on a GPU (below) and the scales here."""
    mod = interpreted(monkeypatch, "fp8_quant_kernel")
    torch.manual_seed(0)
    for shape, dtype in (((37, 640), torch.float16), ((5, 5120), torch.bfloat16), ((3, 320), torch.float32)):
        x = torch.randn(shape, dtype=dtype) * 3
        x[1] = 0
        q, s = mod.quantize_rows(x)
        assert q.dtype == torch.float8_e4m3fn and torch.equal(s, quantize_rows_reference(x)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1280, 5120])  # 4 and 8 warps; the 5120-wide rows are SDXL's widest (GEGLU out)
def test_triton_quantization_and_the_float8_layer_on_gpu(width):
    if not torch.cuda.is_available() or not fp8_gemm.supported(torch.device("cuda")):
        pytest.skip("needs a CUDA GPU with float8 tensor cores")
    from dreambooth_pl.fp8_quant_kernel import quantize_rows

    torch.manual_seed(0)
    wide = torch.randn(1000, width + 64, device="cuda", dtype=torch.float16) * 3
    wide[7] = 0
    strided = wide[:, :width]  # rows 64 values apart: the kernel reads by the row stride
    for x in (strided, strided.contiguous()):
        q, s = quantize_rows(x)
        qr, sr = quantize_rows_reference(x)
        assert torch.equal(s, sr)
        # codes: equal but at rounding ties, where Triton's float8 conversion may pick the other neighbour (8 of
        # 1.28 M codes on an H100 before fp_downcast_rounding="rtne"): adjacent codes, at most 1e-4 of them
        steps = (q.view(torch.uint8).int() - qr.view(torch.uint8).int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() <= 1e-4
    lin = torch.nn.Linear(width, 640, device="cuda", dtype=torch.float16).requires_grad_(False)
    out = Fp8Linear(lin)(x)
    exact = F.linear(dequantized(qr, sr), dequantized(*quantize_rows_reference(lin.weight)), lin.bias.float())
    assert out.dtype == torch.float16
    assert ((out.float() - exact).norm() / exact.norm()).item() < 2e-3  # fp32 accumulation, one fp16 rounding


def test_the_verb_draws_float8_priors_into_their_own_cache_entry(tiny_base, tmp_path):
    """``generate-class-images --fp8_gemms true``: the PNGs say how many layers ran in float8, and the prior cache
    files them under a key of their own (a half-precision draw of the same seeds is not reused for them)."""
    import json

    from dreambooth_pl.io import read_png_metadata
    from dreambooth_pl.sampling import SamplerSettings
    from dreambooth_pl.tools.generate_class_images import generate_class_images

    run = dict(sampler=SamplerSettings(steps=2), progress=False, dtype="float32", device="cpu", num=2, batch_size=2,
               cache_dir=str(tmp_path / "cache"))
    generate_class_images(tiny_base, "a photo of dog", str(tmp_path / "half"), **run)
    msg = generate_class_images(tiny_base, "a photo of dog", str(tmp_path / "eight"), fp8_gemms=True, **run)
    assert "generated 2" in msg and "reused 0" in msg
    meta = read_png_metadata(tmp_path / "eight" / "class_00000.png")
    assert int(meta["fp8_gemm_layers"]) > 0
    keys = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("key.json")]
    assert sorted(k.get("fp8_gemms", False) for k in keys) == [False, True]


def test_compiled_blocks_trace_the_float8_layers_and_draw_their_latents(tiny_base, monkeypatch):
    """With ``compile_blocks`` each block's float8 GEMMs and the formula of their input quantization go through
    torch.compile (a backend that records each graph and runs it as traced: no C++ compiler), no memo inside a
    trace, and the latents are the eager float8 draw's within fp32 rounding."""
    import torch._dynamo

    from dreambooth_pl import prior_sampler
    from dreambooth_pl.prior_sampler import PriorSampler

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2, fp8_gemms=True)
    b = eager.latents("a photo of dog", [5, 6], 3, 5.0, None, 64, 64)
    from torch._dynamo.utils import counters

    monkeypatch.setattr(prior_sampler, "COMPILE_BACKEND", recording)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2, fp8_gemms=True,
                                compile_blocks=True)
        assert compiled.runtime()["fp8_gemm_layers"] == eager.runtime()["fp8_gemm_layers"] > 0
        a = compiled.latents("a photo of dog", [5, 6], 3, 5.0, None, 64, 64)
    finally:
        torch._dynamo.reset()
    # the quantization and the GEMM inside one graph, with no break at the float8 layers
    assert any("_scaled_mm" in g.code and "float8_e4m3fn" in g.code for g in graphs), "no float8 GEMM traced"
    assert not [r for r in counters["graph_break"] if "fp8_gemm" in str(r)]
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()
