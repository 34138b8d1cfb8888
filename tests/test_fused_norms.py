"""group_norm_kernel.py and fused_norms.py: the Triton GroupNorm (with the resnet's add before it and SiLU after it)
gives PyTorch's values and input gradients in NCHW, NHWC and 3-D layouts and keeps the layout; a UNet and a VAE with
their norms fused (and the UNet in NHWC) give their eager outputs and gradients; trainable norms and devices without
the kernels keep diffusers' forwards."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted
from dreambooth_pl import fused_norms


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture
def kernels(monkeypatch):
    """group_norm_kernel.py imported afresh under Triton's interpreter (``TRITON_INTERPRET=1``: the kernels run on
    CPU tensors), and fused_norms told the CPU takes them."""
    mod = interpreted(monkeypatch, "group_norm_kernel")
    monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: True)
    return mod


@pytest.mark.parametrize("shape,groups,layout", [((2, 64, 9, 7), 32, "nchw"), ((2, 64, 9, 7), 32, "nhwc"),
                                                 ((3, 96, 5, 130), 32, "nhwc"), ((2, 40, 33), 4, "3d-t"),
                                                 ((2, 128, 1, 1), 32, "nchw")])
def test_kernel_gives_torchs_group_norm_with_add_and_silu_in_the_inputs_layout(kernels, shape, groups, layout):
    """Pixel and channel counts no multiple of the 64-wide tiles, an offset mean (the merge of partial variances
    must not cancel), a 1x1 map, and a transposed 3-D input (the VAE attention's norm)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3 + 5
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "3d-t":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    add = torch.randn(shape[0], shape[1], generator=gen)
    y = kernels.group_norm(x, groups, w, b, 1e-5, add=add, silu=True)
    ref = F.silu(F.group_norm(x + add.reshape(*add.shape, *(1,) * (x.dim() - 2)), groups, w, b, 1e-5))
    assert y.stride() == x.stride() and _rel(y, ref) < 1e-5
    assert _rel(kernels.group_norm(x, groups, None, None, 1e-6), F.group_norm(x, groups, eps=1e-6)) < 1e-5


def test_kernel_in_bf16_rounds_once(kernels):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 320, 12, 12, generator=gen) * 2).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w, b = torch.randn(320, generator=gen).bfloat16(), torch.randn(320, generator=gen).bfloat16()
    y = kernels.group_norm(x, 32, w, b, 1e-5, silu=True)
    ref = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5))
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < 8e-3  # one bf16 rounding (2^-8) of the fp32 result


def test_a_tensor_whose_pixels_do_not_flatten_is_refused(kernels):
    x = torch.randn(2, 8, 6, 6)[:, :, :, :3]  # a column slice: H's stride is not W's times W
    assert kernels.flat_strides(x) is None
    with pytest.raises(ValueError, match="do not flatten"):
        kernels.group_norm(x, 4, None, None, 1e-5)


def _unet_inputs(unet, batch=2):
    cfg, gen = unet.config, torch.Generator().manual_seed(0)
    size = cfg.sample_size
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (torch.randn(batch, 4, size, size, generator=gen), torch.tensor([500.0] * batch),
            torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen),
            {"text_embeds": torch.randn(batch, text, generator=gen), "time_ids": torch.randn(batch, 6, generator=gen)})


def test_fused_unet_and_vae_give_the_eager_outputs_in_nchw_and_nhwc_and_unfuse_restores(kernels, tiny_base):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    x, t, ctx, added = _unet_inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, ctx, added_cond_kwargs=added).sample
        # every GroupNorm, every resnet and every 2-D transformer's output
        n = sum(type(m).__name__ in ("GroupNorm", "ResnetBlock2D", "Transformer2DModel") for m in unet.modules())
        assert fused_norms.fuse_norms(unet) == n > 0
        fused = unet(x, t, ctx, added_cond_kwargs=added).sample
        fused_norms.to_nhwc(unet)
        nhwc = unet(x, t, ctx, added_cond_kwargs=added).sample
        assert nhwc.is_contiguous(memory_format=torch.channels_last)
        assert fused_norms.unfuse_norms(unet) > 0 and fused_norms.unfuse_norms(unet) == 0
        fused_norms.to_nhwc(unet, on=False)
        again = unet(x, t, ctx, added_cond_kwargs=added).sample
    assert _rel(fused, ref) < 1e-5 and _rel(nhwc, ref) < 1e-5 and torch.equal(again, ref)
    assert not any("forward" in vars(m) or "_get_output_for_continuous_inputs" in vars(m) for m in unet.modules())

    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae").eval()
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z).sample
        assert fused_norms.fuse_norms(vae) > 0
        out = vae.decode(z).sample
    assert _rel(out, ref) < 1e-5


def test_training_gradients_through_the_kernels_equal_eager_and_a_trainable_norm_keeps_diffusers(kernels, tiny_base,
                                                                                                 monkeypatch):
    """A frozen UNet with a trainable input (as LoRA training sees it): the kernels' backward gives eager's input
    gradient, in NCHW and NHWC; a norm whose weight trains runs diffusers' ops (the kernels give no weight grad)."""
    from diffusers import UNet2DConditionModel

    from dreambooth_pl import group_norm_kernel

    calls = []
    real = group_norm_kernel.group_norm
    monkeypatch.setattr(group_norm_kernel, "group_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval().requires_grad_(False)
    x, t, ctx, added = _unet_inputs(unet, batch=1)

    def grad():
        xi = x.clone().requires_grad_(True)
        out = unet(xi, t, ctx, added_cond_kwargs=added).sample
        (out * torch.linspace(-1, 1, out.shape[-1])).square().mean().backward()
        return out.detach(), xi.grad

    ref, ref_grad = grad()
    fused_norms.fuse_norms(unet)
    out, g = grad()
    assert calls and _rel(out, ref) < 1e-5 and _rel(g, ref_grad) < 1e-5
    fused_norms.to_nhwc(unet)
    out, g = grad()
    assert _rel(out, ref) < 1e-5 and _rel(g, ref_grad) < 1e-5
    fused_norms.to_nhwc(unet, on=False)

    for m in unet.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.requires_grad_(True)
    calls.clear()
    grad()
    assert not calls


def test_the_add_gets_its_gradient(kernels):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    add = torch.randn(2, 64, generator=gen).requires_grad_(True)
    w, b, dy = torch.randn(64, generator=gen), torch.randn(64, generator=gen), torch.randn(2, 64, 6, 5, generator=gen)
    got = torch.autograd.grad(kernels.group_norm(x, 32, w, b, 1e-5, add=add, silu=True), (x, add), dy)
    ref = torch.autograd.grad(F.silu(F.group_norm(x + add[:, :, None, None], 32, w, b, 1e-5)), (x, add), dy)
    assert got[0].stride() == x.stride() and all(_rel(a, r) < 1e-5 for a, r in zip(got, ref))


def test_without_the_kernels_the_fused_modules_run_the_same_formula(tiny_base, monkeypatch):
    """A CPU (or a GPU without Triton): the patched modules run the eager ops, bit for bit diffusers'."""
    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: False)
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    x, t, ctx, added = _unet_inputs(unet)
    with torch.no_grad():
        ref = unet(x, t, ctx, added_cond_kwargs=added).sample
        fused_norms.fuse_norms(unet)
        assert torch.allclose(unet(x, t, ctx, added_cond_kwargs=added).sample, ref, rtol=0, atol=1e-6)


def test_a_failing_kernel_warns_once_and_the_norms_run_eagerly(kernels, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernels, "group_norm", broken)
    monkeypatch.setattr(fused_norms, "_kernel_failed", [])
    monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: not fused_norms._kernel_failed)
    norm = torch.nn.GroupNorm(4, 16).eval()
    fused_norms.fuse_norms(norm)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad(), pytest.warns(UserWarning, match="GroupNorm kernels failed"):
        assert torch.equal(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    assert fused_norms._kernel_failed


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_kernels_compile_for_hopper_without_a_gpu(dtype):
    """Triton's compiler, not its interpreter, builds all five kernels to an sm_90 cubin (geglu's lesson), also
    with the sizes a 1x1 map of one channel per group makes constants (the interpreter never does)."""
    import inspect

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dreambooth_pl import group_norm_kernel as k

    consts = {k._partial_stats: dict(HAS_ADD=True, BP=k.BLOCK_P, BC=k.BLOCK_C),
              k._group_stats: dict(BPB=64, BG=128, BP=k.BLOCK_P),
              k._apply: dict(HAS_ADD=True, AFFINE=True, SILU=True, BP=k.BLOCK_P, BC=k.BLOCK_C),
              k._grad_partial: dict(HAS_ADD=True, AFFINE=True, SILU=True, BP=k.BLOCK_P, BC=k.BLOCK_C),
              k._grad_apply: dict(HAS_ADD=True, AFFINE=True, SILU=True, ADD_GRAD=True, BP=k.BLOCK_P, BC=k.BLOCK_C)}
    ones = dict(P=1, C=1, CPG=1, G=1, NPB=1)  # a 1x1 map of one channel: Triton makes int arguments of 1 constants
    for fn, constexprs in [*consts.items(), *((fn, {**c, **{k: v for k, v in ones.items()
                                                         if k in inspect.signature(fn.fn).parameters}})
                                              for fn, c in consts.items())]:
        sig = {}
        for a in inspect.signature(fn.fn).parameters:
            sig[a] = "constexpr" if a in constexprs else "fp32" if a in ("eps", "total") else \
                "*fp32" if a in ("mean_ptr", "m2_ptr", "gmean_ptr", "rstd_ptr", "s1_ptr", "s2_ptr", "c1_ptr", "c2_ptr",
                             "da_ptr") else \
                f"*{dtype}" if a.endswith("_ptr") else "i32"
        assert triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.gpu
def test_gpu_kernel_equals_torch_and_is_timed_at_sdxls_shapes():
    """On the GPU, fp16, SDXL's resnet norms at batch 16 (a guided batch of 8): the fused add + norm + SiLU against
    eager ``x + temb → group_norm → silu`` in NCHW and NHWC, forward alone and with the input's gradient (values
    within fp16 rounding; times printed)."""
    from dreambooth_pl import group_norm_kernel

    if not fused_norms.uses_kernel(torch.device("cuda")):
        pytest.skip("no Triton on this GPU")
    gen = torch.Generator("cuda").manual_seed(0)
    for c, side in [(320, 128), (640, 64), (1280, 32), (2560, 32)]:
        x = torch.randn(16, c, side, side, device="cuda", dtype=torch.float16, generator=gen)
        temb = torch.randn(16, c, device="cuda", dtype=torch.float16, generator=gen)
        w = torch.randn(c, device="cuda", dtype=torch.float16, generator=gen)
        b = torch.randn(c, device="cuda", dtype=torch.float16, generator=gen)

        def eager(x):
            return F.silu(F.group_norm(x + temb[:, :, None, None], 32, w, b, 1e-5))

        def ours(x):
            return group_norm_kernel.group_norm(x, 32, w, b, 1e-5, add=temb, silu=True)

        row = []
        for layout in ("nchw", "nhwc"):
            xi = x if layout == "nchw" else x.contiguous(memory_format=torch.channels_last)
            ref = F.silu(F.group_norm(xi.float() + temb.float()[:, :, None, None], 32, w.float(), b.float(), 1e-5))
            assert _rel(ours(xi), ref) < 2e-3 and ours(xi).stride() == xi.stride()
            for name, fn in (("eager", eager), ("fused", ours)):
                fn(xi)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    fn(xi)
                torch.cuda.synchronize()
                row.append(f"{layout} {name} {(time.perf_counter() - t) / 20 * 1e6:.0f} us")
            xg = xi.detach().requires_grad_(True)  # training: forward and backward, the input's gradient
            dy = torch.randn_like(xi)
            ref = torch.autograd.grad(eager(xg), xg, dy)[0]
            got = torch.autograd.grad(ours(xg), xg, dy)[0]
            assert _rel(got, ref) < 5e-3 and got.stride() == xi.stride()
            for name, fn in (("eager", eager), ("fused", ours)):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    torch.autograd.grad(fn(xg), xg, dy)
                torch.cuda.synchronize()
                row.append(f"{layout} {name} fwd+bwd {(time.perf_counter() - t) / 10 * 1e6:.0f} us")
        print(f"FUSED_NORMS 16x{c}x{side}x{side}: " + ", ".join(row))


def test_a_fit_with_fused_norms_in_nhwc_runs_the_kernels_both_ways_at_the_eager_loss(kernels, tiny_base, subject_dirs,
                                                                                      tmp_path, monkeypatch):
    """``model.perf.fused_norms`` with ``channels_last`` through a real fit (fp32 on the CPU, the kernels run by
    the interpreter): the kernels run forward and backward, the first step's loss is the eager fit's, and the
    adapters train. (Adapter weights after Adam steps are no test: its first updates are about lr·sign(grad),
    which turns rounding-level gradient differences of near-zero entries into whole steps; the UNet-level test
    above compares the gradients themselves.)"""
    from conftest import fit_args
    from dreambooth_pl import group_norm_kernel
    from dreambooth_pl.cli import DreamBoothCLI

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(group_norm_kernel, name)
        monkeypatch.setattr(group_norm_kernel, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **k))

    def fit(name, **over):
        cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path / name), steps=1, **over))
        return float(cli.trainer.logged_metrics["train/loss"]), cli.model.trainable_parameters()

    eager_loss, _ = fit("eager")
    assert calls == {"forward": 0, "backward": 0}
    loss, params = fit("fused", **{"model.perf.fused_norms": "true", "model.perf.channels_last": "true"})
    assert calls["forward"] and calls["backward"]
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    assert all(torch.isfinite(p).all() for p in params.values())


def test_every_resnet_is_fused_when_checkpointing_wraps_every_second_block(tiny_base):
    """``apply_perf`` routes the norms before checkpointing wraps its blocks' forwards (else the wrapped resnets
    would keep diffusers' forward), and the VAE's, which encodes the cache."""
    import dataclasses
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreambooth_pl.memory_plan import manual
    from dreambooth_pl.model_setup import apply_perf
    from dreambooth_pl.settings import PerfSettings

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    m = SimpleNamespace(unet=unet, vae=vae, text_encoder=torch.nn.Identity(), text_encoder_2=torch.nn.Identity())
    perf = dataclasses.replace(manual(PerfSettings()), fused_norms=True, gradient_checkpointing=True,
                               checkpoint_every=2)
    apply_perf(perf, m, (), torch.float32, 0.0)
    resnets = [b for b in unet.modules() if type(b).__name__ == "ResnetBlock2D"]
    wrapped = [b for b in resnets if getattr(b.forward, "checkpointed", False)]
    assert wrapped and all(getattr(b.forward, "__func__", None) is fused_norms._resnet_forward
                           or getattr(b.forward, "checkpointed", False) for b in resnets)
    # the checkpoint wrapper calls the fused forward it wrapped
    assert all(fused_norms._resnet_forward.__code__ in _codes(b.forward) for b in wrapped)
    vae_norms = [n for n in vae.modules() if type(n) is torch.nn.GroupNorm]
    assert vae_norms and all("forward" in vars(n) for n in vae_norms)
    assert not fused_norms.is_nhwc(unet) and not fused_norms.is_nhwc(vae)
    # with channels_last, the VAE's convolutions go NHWC with the UNet's (the cache's encode, the grids' decode)
    apply_perf(dataclasses.replace(perf, channels_last=True), m, (), torch.float32, 0.0)
    assert fused_norms.is_nhwc(unet) and fused_norms.is_nhwc(vae)


def _codes(fn) -> set:
    """The code objects a function closes over (one level), to see what a wrapper calls."""
    cells = getattr(fn, "__closure__", None) or ()
    return {getattr(getattr(c.cell_contents, "__func__", c.cell_contents), "__code__", None) for c in cells}
