"""block_ops.py: norms in the half dtype and the one-kernel GEGLU give the eager blocks' numbers (values and input
gradients), fall back where they cannot apply, and leave the weights alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted
from dreambooth_pl.block_ops import fuse_geglu, gated_gelu, half_norms, unfuse_blocks


def geglu(h: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after its projection: ``a · gelu(g)`` of the two strided halves of one tensor."""
    a, g = h.chunk(2, dim=-1)
    return a * F.gelu(g)


def _close(a, b, rel):
    return float((a.float() - b.float()).abs().max()) <= rel * float(b.float().abs().max())


def _grad_of(module, x, device="cpu", dtype=torch.bfloat16):
    x = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        out = module(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).pow(2).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm(64), torch.nn.GroupNorm(8, 64)])
def test_half_norm_equals_fp32_norm_rounded(norm):
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
    norm = norm.requires_grad_(False).to(torch.bfloat16)
    x = (torch.randn(2, 64, 5, 5) if isinstance(norm, torch.nn.GroupNorm) else torch.randn(2, 7, 64)) * 3 + 1
    x = x.to(torch.bfloat16)
    ref = type(norm)(*([8, 64] if isinstance(norm, torch.nn.GroupNorm) else [64]))
    ref.load_state_dict({k: v.float() for k, v in norm.state_dict().items()})
    with torch.no_grad():
        want = ref(x.float())  # the fp32 norm autocast runs on CUDA, before its consumers round it to bf16
    assert half_norms(torch.nn.Sequential(norm)) == 1 and "forward" in vars(norm)
    got, gx = _grad_of(norm, x)
    assert got.dtype == torch.bfloat16 and _close(got, want, 1e-2)
    assert gx.dtype == torch.bfloat16 and torch.isfinite(gx).all()
    with torch.no_grad():  # without autocast the class's own forward runs (here: bf16 in, bf16 out)
        assert torch.equal(norm(x), type(norm).forward(norm, x))


def test_half_norms_skip_trainable_and_fp32_norms():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.LayerNorm(8).requires_grad_(False),
                                torch.nn.GroupNorm(2, 8, affine=False))
    assert half_norms(model) == 1 and "forward" in vars(model[1])
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights: the class's forward, fp32 out
        assert model[1](x).dtype == torch.float32
    assert unfuse_blocks(model) == 1 and "forward" not in vars(model[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_geglu_equals_diffusers_geglu(dtype):
    """Two GEMMs on the projection's row blocks and the gated gelu give diffusers' GEGLU: to fp32 rounding in fp32,
    within bf16 tolerance under bf16 autocast; an adapter on the projection keeps diffusers' forward."""
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    ff = torch.nn.Sequential(GEGLU(32, 48)).requires_grad_(False)
    x = torch.randn(2, 9, 32)

    def run():
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            out = ff(xg)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum().backward()
        return out.detach(), xg.grad

    ref = run()
    w = ff[0].proj.weight.clone()
    assert fuse_geglu(ff) == 1
    got = run()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert got[0].dtype == ref[0].dtype and _close(got[0], ref[0], tol) and _close(got[1], ref[1], tol * 5)
    assert torch.equal(ff[0].proj.weight, w)
    ff[0].proj = torch.nn.Sequential(ff[0].proj)  # not a plain Linear (as with an adapter): diffusers' path
    assert torch.equal(run()[0], ref[0])
    assert unfuse_blocks(ff) == 1


def test_gated_gelu_is_geglu_of_the_halves():
    h = torch.randn(3, 10)
    assert torch.equal(gated_gelu(*h.chunk(2, dim=-1)), geglu(h))


def test_module_switch_patches_the_unet_under_mixed_precision_only(tiny_base):
    import lightning as L

    from dreambooth_pl.module import DreamBoothLoRA
    from dreambooth_pl.settings import PerfSettings

    def patched(precision):
        module = DreamBoothLoRA(base_model=tiny_base, perf=PerfSettings(fused_blocks=True))
        module.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
        module.configure_model()
        return unfuse_blocks(module.unet)

    assert patched("bf16-mixed") > 0
    assert patched("32-true") == 0  # fp32 weights: no autocast round trip to remove


def test_tiny_unet_with_fused_blocks_matches_eager_under_autocast(tiny_base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").requires_grad_(False)
    unet.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    args = (torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16), torch.tensor([10, 500]),
            torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(torch.bfloat16))
    cond = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            return unet(*args, added_cond_kwargs=cond).sample.float()

    ref = run()
    assert half_norms(unet) > 0 and fuse_geglu(unet) > 0
    assert _close(run(), ref, 2e-2)


@pytest.mark.gpu
def test_compiled_geglu_equals_eager_on_gpu_and_in_a_cuda_graph():
    """SDXL's widest GEGLU (2 x 1024 tokens, 1280 -> 2 x 5120) in bf16: the Triton kernels equal the eager
    formula in values and gradients, and replays from a CUDA graph."""
    from dreambooth_pl.block_ops import _gated_gelu

    def _geglu_act(h):
        return _gated_gelu(*(x.contiguous() for x in h.chunk(2, dim=-1)))

    torch.manual_seed(0)
    h = torch.randn(2, 1024, 10240, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(2, 1024, 5120, device="cuda", dtype=torch.bfloat16)

    def run(fn, x):
        x = x.detach().requires_grad_(True)
        out = fn(x)
        out.backward(g)
        return out.detach(), x.grad

    ref, got = run(geglu, h), run(_geglu_act, h)
    assert _close(got[0], ref[0], 1e-2) and _close(got[1], ref[1], 1e-2)
    static = h.detach().clone().requires_grad_(True)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _geglu_act(static).backward(g)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    static.grad = None
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        out = _geglu_act(static)
        grad, = torch.autograd.grad(out, static, g)
    static.data.copy_(h * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    want = run(geglu, h * 0.5)
    assert _close(out, want[0], 1e-2) and _close(grad, want[1], 1e-2)


def test_fast_kernels_fit_on_cpu_under_bf16(tiny_base, subject_dirs, tmp_path):
    """The fast preset's kernels through a real fit (bf16-mixed on the CPU): the adapters train and stay fp32."""
    from dreambooth_pl.cli import DreamBoothCLI
    from conftest import fit_args

    over = {"trainer.precision": "bf16-mixed", "model.perf.fused_lora": "true", "model.perf.fused_blocks": "true",
            "model.perf.cache": "all"}
    cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=2, **over))
    params = cli.model.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params.values())
    assert np.isfinite(float(cli.trainer.logged_metrics["train/loss"]))
    assert unfuse_blocks(cli.model.unet) > 0  # the switch reached the trained UNet


@pytest.fixture
def interpreted_kernel(monkeypatch):
    """geglu_kernel.py imported afresh under Triton's interpreter (``TRITON_INTERPRET=1``), which runs the kernels
    on CPU tensors; block_ops' own import of it is this module for the test."""
    from dreambooth_pl import block_ops

    mod = interpreted(monkeypatch, "geglu_kernel")
    monkeypatch.setattr(block_ops, "uses_kernel", lambda device: True)
    return mod


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_geglu_kernel_gives_the_formulas_values_and_gradients(interpreted_kernel, dtype, tol):
    """The Triton kernels (run by the interpreter) against the eager formula in fp32, over shapes that are no
    multiple of the block and one that is: values and both gradients, through block_ops' activation. One kernel
    serves every shape (aspect buckets): nothing is compiled per shape, so no recompile limit applies."""
    from dreambooth_pl import block_ops

    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 7, 9), (2, 33, 64), (4, 1024)]:
        a = torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
        g = (2 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_(True)
        grad = torch.randn(shape, generator=gen).to(dtype)
        out = block_ops._gated_gelu(a, g)
        assert out.dtype == dtype and out.grad_fn is not None and type(out.grad_fn).__name__ == "GatedGeluBackward"
        da, dg = torch.autograd.grad(out, (a, g), grad)
        a32, g32 = a.detach().float().requires_grad_(True), g.detach().float().requires_grad_(True)
        ref = gated_gelu(a32, g32)
        ra, rg = torch.autograd.grad(ref, (a32, g32), grad.float())
        assert _close(out.float(), ref, tol) and _close(da.float(), ra, tol) and _close(dg.float(), rg, tol)
        with torch.no_grad():  # the sampler's path: the forward kernel alone
            assert torch.equal(block_ops._gated_gelu(a, g), out.detach())
    empty = torch.empty(0, 5, dtype=dtype)
    assert block_ops._gated_gelu(empty, empty).shape == (0, 5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_triton_geglu_kernels_compile_for_hopper_without_a_gpu(dtype):
    """Triton's interpreter runs what its compiler may refuse (a plain float global was one, found only on the GPU):
    both kernels are compiled here to an sm_90 cubin, the GPU's whole build, with Triton's own ptxas."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dreambooth_pl import geglu_kernel

    kernels = {geglu_kernel._forward_kernel: ("a_ptr", "g_ptr", "out_ptr"),
               geglu_kernel._backward_kernel: ("grad_ptr", "a_ptr", "g_ptr", "da_ptr", "dg_ptr")}
    for fn, pointers in kernels.items():
        signature = {**{p: f"*{dtype}" for p in pointers}, "n": "i32", "BLOCK_SIZE": "constexpr"}
        src = ASTSource(fn=fn, signature=signature, constexprs={"BLOCK_SIZE": geglu_kernel.BLOCK})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]


def test_a_failing_triton_kernel_falls_back_to_the_eager_formula_once(interpreted_kernel, monkeypatch):
    """A Triton that cannot build the kernel costs one warning, not the fit: the activation runs eagerly after."""
    from dreambooth_pl import block_ops

    def broken(a, g):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(interpreted_kernel, "gated_gelu", broken)
    monkeypatch.setattr(block_ops, "_kernel_failed", [])
    monkeypatch.setattr(block_ops, "uses_kernel", lambda device: not block_ops._kernel_failed)
    a, g = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.warns(UserWarning, match="Triton GEGLU kernel failed"):
        assert torch.equal(block_ops._gated_gelu(a, g), gated_gelu(a, g))
    assert block_ops._kernel_failed and not block_ops.uses_kernel(torch.device("cuda"))
    assert torch.equal(block_ops._gated_gelu(a, g), gated_gelu(a, g))


def test_out_of_memory_in_the_triton_geglu_is_raised_not_taken_for_a_broken_kernel(interpreted_kernel, monkeypatch):
    """Running out of memory is the activation's size, not Triton: it is raised, and the kernel stays in use."""
    from dreambooth_pl import block_ops

    def full(a, g):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 640.00 MiB")

    monkeypatch.setattr(interpreted_kernel, "gated_gelu", full)
    monkeypatch.setattr(block_ops, "_kernel_failed", [])
    with pytest.raises(torch.OutOfMemoryError):
        block_ops._gated_gelu(torch.randn(3, 4), torch.randn(3, 4))
    assert not block_ops._kernel_failed


def test_the_activation_runs_the_kernel_only_on_a_gpu_with_triton(monkeypatch):
    """The activation's kernels are Triton's: without it the activation (and the sampler's fused GEGLU) runs
    eagerly instead of failing at the first draw."""
    import torch.utils._triton as triton_utils

    from dreambooth_pl import block_ops
    from dreambooth_pl.prior_defaults import default_fused_geglu

    cuda = torch.device("cuda")
    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    assert not block_ops.uses_kernel(cuda) and not default_fused_geglu(cuda, False, "float16")
    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    assert block_ops.uses_kernel(cuda) and not block_ops.uses_kernel(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["layer", "group"])
def test_half_norms_on_gpu_replace_autocasts_fp32_round_trip(kind):
    """On CUDA autocast runs the norms in fp32 (the CPU's autocast does not, so only here can the change show):
    the patched norm returns bf16 values equal to autocast's fp32 output rounded, and the input gradients agree."""
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(1280) if kind == "layer" else torch.nn.GroupNorm(32, 640)
    norm = norm.cuda().requires_grad_(False).to(torch.bfloat16)
    shape = (2, 1024, 1280) if kind == "layer" else (2, 640, 64, 64)
    x = (torch.randn(*shape, device="cuda") * 3 + 1).to(torch.bfloat16)
    ref = _grad_of(norm, x, "cuda")
    assert ref[0].dtype == torch.float32  # autocast's own choice for the unpatched norm
    assert half_norms(torch.nn.Sequential(norm)) == 1
    got = _grad_of(norm, x, "cuda")
    assert got[0].dtype == torch.bfloat16 and _close(got[0], ref[0], 1e-2) and _close(got[1], ref[1], 2e-2)
