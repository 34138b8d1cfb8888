"""kernel_warmup.py: the kernels it builds ahead are the ones a training step launches (Triton's specialisation
keys, compared on the interpreter), at the UNet's map sizes; on a GPU, a step after it builds nothing new."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import interpreted
from dreambooth_pl import block_ops, fused_norms, kernel_warmup


def _key(kernel, args, kwargs) -> tuple:
    """What Triton specialises a build on (JITFunction.run's binder): each pointer's dtype and 16-byte alignment,
    each int's equality to 1, divisibility by 16 and width, each float as a float, and the constexprs."""
    spec = []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append(("ptr", a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            spec.append(("const", a))
        elif isinstance(a, int):
            spec.append(("int", a == 1, a % 16 == 0, abs(a) >= 2**31))
        else:
            spec.append(("float",))
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
    return name, tuple(spec), tuple(sorted(kwargs.items()))


@pytest.fixture
def recorded(monkeypatch):
    """Both kernel files on the interpreter, the CPU taking them, and every launch or build recorded by key: a
    real tensor runs the kernel, a meta tensor (the warm-up) is only recorded."""
    keys = {"run": set(), "warm": set()}
    for name in ("group_norm_kernel", "geglu_kernel", "fp8_quant_kernel"):
        mod = interpreted(monkeypatch, name)
        real = mod._run

        def run(kernel, grid, *args, _real=real, **kwargs):
            keys["warm" if args[0].is_meta else "run"].add(_key(kernel, args, kwargs))
            if not args[0].is_meta:
                _real(kernel, grid, *args, **kwargs)

        monkeypatch.setattr(mod, "_run", run)
    monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: True)
    monkeypatch.setattr(block_ops, "uses_kernel", lambda device: True)
    return keys


def _step(unet, size: int, channels_last: bool) -> None:
    """A LoRA step's UNet pass as the kernels see it: frozen weights, a trainable input, forward and backward."""
    cfg, gen = unet.config, torch.Generator().manual_seed(0)
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(2, 4, size, size, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = unet(x, torch.tensor([500.0, 20.0]), torch.randn(2, 77, cfg.cross_attention_dim, generator=gen),
               added_cond_kwargs={"text_embeds": torch.randn(2, text, generator=gen),
                                  "time_ids": torch.randn(2, 6, generator=gen)}).sample
    out.square().mean().backward()


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_warm_up_builds_every_kernel_a_training_step_launches(recorded, tiny_base, channels_last):
    """The tiny SDXL-layout UNet, its norms fused and GEGLUs on the kernel, one training pass at a 16² latent: each
    (kernel, specialisation) it launches is one the warm-up built from the module tree and the image size alone."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").requires_grad_(False)
    for p in unet.parameters():  # each weight in its own allocation, as on a GPU: a CPU load maps the file, and a
        p.data = p.data.clone()  # weight at an odd offset in it is a pointer Triton does not take as 16-aligned
    assert fused_norms.fuse_norms(unet) and block_ops.fuse_geglu(unet)
    if channels_last:
        fused_norms.to_nhwc(unet)
    _step(unet, 16, channels_last)
    norms, widths = kernel_warmup.norm_calls(unet), kernel_warmup.geglu_widths(unet)
    sizes = kernel_warmup.latent_sizes({(128, 128)}, len(unet.config.block_out_channels))
    calls = kernel_warmup.warm(norms, widths, sizes, torch.float32, channels_last)
    assert recorded["run"] and calls >= len(recorded["warm"])
    missing = recorded["run"] - recorded["warm"]
    assert not missing, f"launched but not built ahead: {sorted(missing, key=str)[:3]}"
    # and nothing it built is of a kind the step never launches (names: the kernels themselves)
    assert {k[0] for k in recorded["warm"]} == {k[0] for k in recorded["run"]}
    before = set(recorded["warm"])
    recorded["warm"].clear()  # the same calls when the builds go to a pool (Triton's AsyncCompileMode)
    assert kernel_warmup.warm(norms, widths, sizes, torch.float32, channels_last, workers=2) == calls
    assert recorded["warm"] == before


def test_the_warm_up_builds_every_kernel_a_prior_draw_launches(recorded, tiny_base):
    """A prior draw on the tiny base with the fused norms and GEGLU (guided, 1 step, 32², then the VAE decode):
    each (kernel, specialisation) it launches, the UNet's and the VAE decoder's, is one that the warm-up of
    draw_groups built, forward only (no gradient kernel)."""
    from dreambooth_pl.prior_sampler import PriorSampler

    s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=1, fused_norms=True, fused_geglu=True)
    for p in list(s.pipe.unet.parameters()) + list(s.pipe.vae.parameters()):
        p.data = p.data.clone()  # each weight in its own allocation, as on a GPU (see the training test)
    assert s.speedups.fused_norms and s.speedups.fused_geglu and not s.warm_kernels  # (the draw warms only on CUDA)
    list(s.images("a photo of dog", [0], steps=1, guidance=5.0, height=32, width=32))
    groups = kernel_warmup.draw_groups(s.pipe.unet, s.pipe.vae, (32, 32), torch.float32, torch.float32, False,
                                       True, True)
    assert len(groups) == 3 and groups[1][2] == {(4, 4), (8, 8), (16, 16), (32, 32)}  # the VAE's, latent up
    assert kernel_warmup.warm_all(groups, backward=False, workers=2) > 0
    missing = recorded["run"] - recorded["warm"]
    assert recorded["run"] and not missing, f"launched but not built ahead: {sorted(missing, key=str)[:3]}"
    assert not {k[0] for k in recorded["warm"]} & {"_grad_partial", "_grad_apply", "_backward_kernel"}


FP8_KERNELS = ("_quantize_rows_kernel", "_layer_norm_rows_kernel", "_gated_gelu_rows_kernel")


def test_the_warm_up_builds_every_kernel_a_float8_draw_launches(recorded, tiny_base, monkeypatch):
    """A float8 draw (fp8_gemm.py, fused blocks: fp8_block.py) with its quantization kernels on the interpreter:
    the specialisations it launches are those the warm-up built from :func:`kernel_warmup.fp8_calls`, no more,
    no fewer; with compiled blocks only proj_in's and proj_out's remain."""
    from dreambooth_pl import fp8_gemm
    from dreambooth_pl.prior_sampler import PriorSampler

    monkeypatch.setattr(fp8_gemm, "runs_kernels", lambda x: not torch.compiler.is_compiling())
    s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=1, fused_geglu=True, fp8_gemms=True)
    for p in s.pipe.unet.parameters():
        p.data = p.data.clone()
    assert s.speedups.fp8_fused_blocks > 0
    list(s.images("a photo of dog", [0], steps=1, guidance=5.0, height=32, width=32))
    calls = kernel_warmup.fp8_calls(s.pipe.unet)
    assert {kind for kind, _ in calls} == {"rows", "norm", "norm+add", "geglu"}
    assert kernel_warmup.warm_all([], backward=False, workers=2, fp8=(calls, torch.float32)) == len(calls)
    launched = {k for k in recorded["run"] if k[0] in FP8_KERNELS}
    assert {k[0] for k in launched} == set(FP8_KERNELS)
    missing = launched - recorded["warm"]
    assert not missing, f"launched but not built ahead: {sorted(missing, key=str)[:3]}"
    assert {k for k in recorded["warm"] if k[0] in FP8_KERNELS} == launched  # nothing built in vain
    for block in [m for m in s.pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]:
        block.compile(backend="eager")  # (only marked: fp8_calls reads the mark)
    outside = {("rows", m.proj_in.in_features) for m in s.pipe.unet.modules()
               if type(m).__name__ == "Transformer2DModel"}
    assert kernel_warmup.fp8_calls(s.pipe.unet) == outside | {("rows", m.proj_out.in_features)
                                                            for m in s.pipe.unet.modules()
                                                            if type(m).__name__ == "Transformer2DModel"}


def test_a_failed_draw_warm_up_warns_once_per_size_and_the_draw_goes_on(tiny_base, monkeypatch):
    import contextlib

    from dreambooth_pl.prior_sampler import PriorSampler

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nmore")

    s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=1)
    s.warm_kernels = True  # (a CPU draw never warms: forced here to reach the failure)
    monkeypatch.setattr(kernel_warmup, "warm_all", broken)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with pytest.warns(UserWarning, match=r"kernels ahead failed \(RuntimeError: no compiler here\)"):
        s._warm(64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        s._warm(64, 64)  # tried once per size
    assert len(list(s.images("a photo of dog", [0], steps=1, height=64, width=64))) == 1


def test_norm_calls_take_each_resnets_two_norms_with_their_add_and_the_other_norms_plain(tiny_base):
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    assert not kernel_warmup.norm_calls(unet) and not kernel_warmup.geglu_widths(unet)  # nothing fused yet
    fused_norms.fuse_norms(unet)
    block_ops.fuse_geglu(unet)
    calls = kernel_warmup.norm_calls(unet)
    resnet = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D))
    assert kernel_warmup.NormCall(resnet.norm2.num_channels, resnet.norm2.num_groups, True, True, True) in calls
    assert kernel_warmup.NormCall(unet.conv_norm_out.num_channels, unet.conv_norm_out.num_groups, True, False,
                                  False) in calls  # the output norm: its SiLU is a module of its own
    assert all(c.silu or not c.add for c in calls)
    ff = next(m for m in unet.modules() if type(m).__name__ == "GEGLU")
    assert kernel_warmup.geglu_widths(unet) == {ff.proj.out_features // 2}
    from dreambooth_pl.perf import set_checkpointing

    set_checkpointing(unet, 2)  # every second block wrapped: its resnets' norms still fused with their add
    assert kernel_warmup.norm_calls(unet) == calls


def test_latent_sizes_follow_the_stride_two_levels_of_each_bucket():
    assert kernel_warmup.latent_sizes({(1024, 1024)}, 3) == {(128, 128), (64, 64), (32, 32)}
    # 1152x896 -> 144x112 latents; 1216x832 -> 152x104 -> 76x52 -> 38x26; an odd side rounds up (padding 1)
    assert kernel_warmup.latent_sizes({(1216, 832), (200, 120)}, 3) == {
        (152, 104), (76, 52), (38, 26), (25, 15), (13, 8), (7, 4)}


def test_no_warm_up_off_the_gpu_and_a_failing_one_is_reported_not_raised(tiny_base, monkeypatch):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    fused_norms.fuse_norms(unet)
    assert kernel_warmup.start(unet, {(128, 128)}, torch.float32, False, torch.device("cpu")) is None
    assert kernel_warmup.start(unet, {(128, 128)}, torch.float32, False, None) is None

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nmore")

    monkeypatch.setattr(kernel_warmup, "warm", broken)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    w = kernel_warmup.KernelWarmup(kernel_warmup.norm_calls(unet), set(), {(16, 16)}, torch.float32, False,
                                   torch.device("cuda"))
    assert w.join() >= 0 and w.error == "RuntimeError: no compiler here" and w.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_after_the_warm_up_a_training_step_builds_no_kernel(tiny_base, dtype):
    """Each kernel's in-memory builds emptied, the warm-up run on its thread (KernelWarmup), then a real fp16/bf16
    NHWC training pass: every specialisation it launched was already there (none added by the step)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet", torch_dtype=dtype).cuda()
    unet.requires_grad_(False)
    fused_norms.fuse_norms(unet)
    block_ops.fuse_geglu(unet)
    fused_norms.to_nhwc(unet)
    kernels = kernel_warmup.kernels()
    for k in kernels:
        k.device_caches.clear()
    w = kernel_warmup.start(unet, {(128, 128)}, dtype, True, torch.device("cuda"))
    assert w is not None and w.join() >= 0 and w.error is None, w.error
    built = {id(k): set(k.device_caches[torch.cuda.current_device()][0]) for k in kernels}
    assert all(built[id(k)] for k in kernels if k.fn.__name__ not in FP8_KERNELS), "the warm-up built nothing"
    before = kernel_warmup.built(torch.device("cuda"))
    assert before == sum(map(len, built.values()))
    cfg = unet.config
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        out = unet(x.requires_grad_(True), torch.tensor([500.0, 20.0], device="cuda"),
                   torch.randn(2, 77, cfg.cross_attention_dim, device="cuda", dtype=dtype),
                   added_cond_kwargs={"text_embeds": torch.randn(2, text, device="cuda", dtype=dtype),
                                      "time_ids": torch.randn(2, 6, device="cuda", dtype=dtype)}).sample
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    for k in kernels:
        new = set(k.device_caches[torch.cuda.current_device()][0]) - built[id(k)]
        assert not new, f"{k}: built at launch, missed by the warm-up: {new}"
    assert kernel_warmup.built(torch.device("cuda")) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_after_the_warm_up_a_prior_draw_builds_no_kernel(tiny_base, fp8):
    """The sampler's own warm-up (PriorSampler._warm, fp16 UNet in NHWC, bf16 VAE; float8 GEMMs and fused blocks
    too) from empty in-memory caches, then a guided draw through the CUDA graph and the decode: no specialisation
    added."""
    from dreambooth_pl.fp8_gemm import supported
    from dreambooth_pl.prior_sampler import PriorSampler

    if fp8 and not supported(torch.device("cuda")):
        pytest.skip("needs float8 tensor cores")
    s = PriorSampler(tiny_base, "euler", "float16", "cuda", batch_size=2, fp8_gemms=fp8)
    sp = s.speedups
    assert s.warm_kernels and sp.fused_norms and sp.fused_geglu and sp.channels_last
    assert bool(sp.fp8_fused_blocks) == fp8
    for k in kernel_warmup.kernels():
        k.device_caches.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s._warm(64, 64)
    failed = [str(w.message) for w in caught if "kernels ahead failed" in str(w.message)]
    assert not failed, failed  # (a failed warm-up only warns a user)
    before = kernel_warmup.built(torch.device("cuda"))
    assert before > 0 and s.kernel_build_s > 0
    list(s.images("a photo of dog", [0, 1], steps=2, guidance=5.0, height=64, width=64))
    torch.cuda.synchronize()
    assert kernel_warmup.built(torch.device("cuda")) == before
