"""prior_sampler.py: the batched fixed-shape sampler draws diffusers' StableDiffusionXLPipeline's images at the same
seeds and settings, whatever the batch and a short last one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth_pl.perf import fuse_attention
from dreambooth_pl.prior_defaults import default_dtype
from dreambooth_pl.prior_sampler import PriorSampler

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def sampler(tiny_base):
    return PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3)


def pipeline_images(base, scheduler, prompt, seeds, negative, guidance) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32, add_watermarker=False)
    pipe.scheduler = type(scheduler).from_config(scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=[prompt] * len(seeds), negative_prompt=[negative] * len(seeds) if negative else None,
                num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images


@pytest.mark.parametrize("negative,guidance", [(None, 5.0), ("blurry", 7.5), (None, 1.0)])
def test_same_images_as_the_diffusers_pipeline(sampler, tiny_base, negative, guidance):
    """fp32 on the CPU: equal within float rounding (measured 2e-6), with SDXL's zero negative, a negative prompt,
    and guidance off; two seeds in a batch of three (a short batch, drawn at its own size)."""
    seeds = [5, 6]
    ours = sampler.decode(sampler.latents("a photo of dog", seeds, STEPS, guidance, negative, SIZE, SIZE))
    ref = pipeline_images(tiny_base, sampler.pipe.scheduler, "a photo of dog", seeds, negative, guidance)
    assert ours.shape == (2, 3, SIZE, SIZE) and ours.std() > 0.01
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() < 1e-4


def test_an_image_depends_on_its_seed_only(sampler):
    """Image i is the same alone, in a full batch, or behind other seeds."""
    together = list(sampler.images("a photo of dog", [1, 2, 3, 4], STEPS, 5.0, None, SIZE, SIZE))
    alone = list(sampler.images("a photo of dog", [3], STEPS, 5.0, None, SIZE, SIZE))
    assert [s for s, _ in together] == [1, 2, 3, 4]
    a, b = np.asarray(together[2][1]).astype(int), np.asarray(alone[0][1]).astype(int)
    assert np.abs(a - b).max() <= 1  # uint8 rounding of fp32 sums taken in another batch order
    assert np.abs(np.asarray(together[0][1]).astype(int) - a).max() > 10


def test_fused_attention_draws_the_unfused_latents_and_frees_the_separate_projections(tiny_base):
    """``fuse_qkv`` runs fused q/k/v (k/v across) and draws the default's latents within fp32 rounding of a
    concatenated GEMM; the fused UNet holds no separate self-attention q/k/v or cross k/v."""
    from diffusers.models.attention_processor import Attention

    fused = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3, fuse_qkv=True)
    plain = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3)
    assert fused.runtime()["fuse_qkv"] and not plain.runtime()["fuse_qkv"]
    # the fused k/v projection (to_kv) still takes the zeroed negative's constant (zero_negative.py)
    assert fused.runtime()["constant_negative_layers"] == plain.runtime()["constant_negative_layers"] > 0
    a = fused.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    b = plain.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()
    attns = [m for m in fused.pipe.unet.modules() if isinstance(m, Attention)]
    assert attns and all(not hasattr(m, "to_k") and not hasattr(m, "to_v") for m in attns)
    assert all(hasattr(m, "to_q") == m.is_cross_attention for m in attns)
    unet = plain.pipe.unet
    separate = sum(p.numel() for m in unet.modules() if isinstance(m, Attention)
                   for n in (("to_k", "to_v") if m.is_cross_attention else ("to_q", "to_k", "to_v"))
                   for p in getattr(m, n).parameters())
    assert fuse_attention(unet) == separate > 0


def test_fused_geglu_draws_the_default_latents(sampler, tiny_base):
    """``fused_geglu`` routes every GEGLU through two GEMMs on the weight's halves and one activation (compiled on a
    GPU, the same formula eagerly here) and draws the default's latents within fp32 rounding; off by default on a
    CPU."""
    from diffusers.models.activations import GEGLU

    fused = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3, fused_geglu=True)
    assert fused.runtime()["fused_geglu"] and not sampler.runtime()["fused_geglu"]
    layers = [m for m in fused.pipe.unet.modules() if type(m) is GEGLU]
    assert layers and all("forward" in vars(m) for m in layers)
    a = fused.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    b = sampler.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()


def test_compiled_blocks_draw_the_default_latents(sampler, tiny_base, monkeypatch):
    """``compile_blocks`` puts every transformer and resnet block through torch.compile (here a backend that
    records each graph dynamo captures and runs it as traced, so the test needs no C++ compiler) and draws the
    default's latents within fp32 rounding; a short batch is padded to the compiled shape (another shape would
    compile every block again); the prior cache keys compiled draws apart, old keys unchanged."""
    import torch._dynamo

    from dreambooth_pl import draw_speedups, prior_sampler
    from dreambooth_pl.data.prior_cache import prior_key

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(prior_sampler, "COMPILE_BACKEND", recording)
    torch._dynamo.reset()
    try:
        compiled = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3, compile_blocks=True)
        unet = compiled.pipe.unet
        blocks = [m for m in unet.modules() if type(m).__name__ in draw_speedups.UNET_BLOCKS]
        assert compiled.runtime()["compiled_blocks"] == len(blocks) > 0 and sampler.runtime()["compiled_blocks"] == 0
        shapes = []
        hook = unet.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[0]))
        a = compiled.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
        hook.remove()
        assert graphs, "no block went through torch.compile"
        # two seeds of a batch of three: padded to the compiled shape (guidance doubles it), not drawn at two
        assert set(shapes) == {6}
        plain_shapes = []
        hook = sampler.pipe.unet.register_forward_pre_hook(lambda m, args: plain_shapes.append(args[0].shape[0]))
        sampler.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
        hook.remove()
        assert set(plain_shapes) == {4}  # without compiled blocks a short batch runs at its own size
    finally:
        torch._dynamo.reset()
    b = sampler.latents("a photo of dog", [5, 6], STEPS, 5.0, None, SIZE, SIZE)
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()
    key = dict(base_root=tiny_base, vae=None, prompt="p", negative_prompt=None, scheduler="euler", steps=3,
               guidance=5.0, height=64, width=64)
    assert "compiled" not in prior_key(**key) and prior_key(**key, compiled=True)["compiled"] is True


def test_cudnn_benchmark_is_set_while_drawing_and_restored(tiny_base, monkeypatch):
    """``cudnn_benchmark`` turns cuDNN's benchmark mode on for the denoising loop and the decode only: the
    process-wide flag is restored after each, also when a batch fails."""
    s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2, cudnn_benchmark=True)
    seen = []
    unet = s.pipe.unet.forward
    monkeypatch.setattr(s.pipe.unet, "forward",
                        lambda *a, **k: seen.append(torch.backends.cudnn.benchmark) or unet(*a, **k))
    torch.backends.cudnn.benchmark = False
    list(s.images("a photo of dog", [1], 2, 5.0, None, SIZE, SIZE))
    assert seen and all(seen) and not torch.backends.cudnn.benchmark and s.runtime()["cudnn_benchmark"]

    def fail(*a, **k):
        assert torch.backends.cudnn.benchmark
        raise RuntimeError("boom")

    monkeypatch.setattr(s.pipe.unet, "forward", fail)
    with pytest.raises(RuntimeError, match="boom"):
        s.latents("a photo of dog", [1], 2, 5.0, None, SIZE, SIZE)
    assert not torch.backends.cudnn.benchmark


def test_cudnn_attention_is_a_kernel_preference_not_other_maths(sampler, tiny_base):
    """``attention: cudnn`` only reorders torch's kernel choice (on a CPU none of the fused kernels applies, so
    the maths one runs: the same latents); a misspelt value is refused before any model loads."""
    other = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=3, attention="cudnn", graph=False)
    assert other.runtime()["attention"] == "cudnn"
    a = sampler.latents("a photo of dog", [5], STEPS, 5.0, None, SIZE, SIZE)
    b = other.latents("a photo of dog", [5], STEPS, 5.0, None, SIZE, SIZE)
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()
    with pytest.raises(ValueError, match="attention is one of .*, got 'flash2'"):
        PriorSampler(tiny_base, "euler", "float32", "cpu", attention="flash2")


def test_cpu_dtype_and_batch_bounds(sampler):
    assert default_dtype(torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match="a batch holds 1 to 3 seeds, got 4"):
        sampler.latents("a photo of dog", [1, 2, 3, 4], STEPS, 5.0, None, SIZE, SIZE)


def test_a_prompt_is_encoded_once_and_parked_encoders_go_back_to_the_cpu(tiny_base, monkeypatch):
    """Every batch of one prompt reuses its embeddings (one ``encode_prompt`` per prompt, negative prompt and
    guidance), with the same images; with ``park_text_encoders`` the encoders end on the CPU, the UNet on the device.
    On a CPU device parking is off (nothing to park from); the test turns it on to follow the moves."""
    s = PriorSampler(tiny_base, "euler", "float32", "cpu", batch_size=2)
    assert not PriorSampler(tiny_base, "euler", "float32", "cpu", park_text_encoders=True).park_text_encoders
    calls, moves = [], []
    encode = s.pipe.encode_prompt
    monkeypatch.setattr(s.pipe, "encode_prompt", lambda *a, **k: calls.append(a[0]) or encode(*a, **k))
    first = s.latents("a photo of dog", [1, 2], STEPS, 5.0, None, SIZE, SIZE)
    s.park_text_encoders = True
    to = type(s.pipe.text_encoder_2).to
    monkeypatch.setattr(type(s.pipe.text_encoder_2), "to", lambda m, *a, **k: moves.append(str(a[0])) or to(m, *a, **k))
    again = s.latents("a photo of dog", [1, 2], STEPS, 5.0, None, SIZE, SIZE)
    assert calls == ["a photo of dog"] and moves == []  # cached: the encoders are not even moved
    s.latents("a photo of cat", [1], STEPS, 5.0, None, SIZE, SIZE)
    assert calls == ["a photo of dog", "a photo of cat"] and moves == ["cpu", "cpu"]  # there and back
    # the cached embeddings are the same tensors; the UNet's CPU kernels are compared within fp32 rounding
    assert torch.allclose(first, again, rtol=1e-5, atol=1e-6) and s.runtime()["park_text_encoders"]


@pytest.mark.gpu
def test_graph_replay_equals_eager_and_fp16_matches_the_pipeline_on_gpu(tiny_base):
    """On the GPU: the graph-replayed sampler equals its eager self; with the pipeline's fp16 UNet, fp32 VAE and
    diffusers' GEGLU it draws the pipeline's images, with the one-kernel GEGLU or the constant negative
    cross-attention or the Triton GroupNorms (NCHW and NHWC) within fp16 rounding of them; the
    distance of the default (bf16 VAE), of an all-bf16 run and of compiled blocks is printed.
    Measured 2026-12-04 before the default VAE became bf16: fp16 0.0 with and without the graph, bf16 0.19."""
    seeds, size, steps = [0, 1, 2], 128, 25

    def images(dtype, graph, vae_dtype=None, batch_size=len(seeds), **switches):
        s = PriorSampler(tiny_base, "euler", dtype, "cuda", batch_size=batch_size, graph=graph, vae_dtype=vae_dtype,
                         **switches)
        out = torch.cat([s.decode(s.latents("a photo of dog", seeds[i:i + batch_size], steps, 5.0, None, size,
                                            size)).cpu() for i in range(0, len(seeds), batch_size)])
        assert s.graph == graph, "the CUDA-graph capture failed and the sampler fell back to eager"
        assert bool(s._graphs) == graph  # a full batch was captured (a short one alone runs eagerly)
        # with the constant negative (the default) each captured graph skips the batch's negative half
        skipped = batch_size if switches.get("constant_negative", True) else 0
        assert all(key[2] == skipped for key in s._graphs) and (s.runtime()["constant_negative_layers"] > 0) == (
            skipped > 0)
        return out

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base, dtype=torch.float16, add_watermarker=False).to("cuda")
    pipe.scheduler = PriorSampler(tiny_base, "euler", "float32", "cpu").pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    ref = torch.from_numpy(pipe(prompt=["a photo of dog"] * 3, num_inference_steps=steps, guidance_scale=5.0,
                                height=size, width=size, output_type="np",
                                generator=[torch.Generator().manual_seed(s) for s in seeds]).images).permute(0, 3, 1, 2)
    pipeline_vae = "float32" if pipe.vae.config.force_upcast else "float16"
    # diffusers' own GEGLU and every cross-attention computed: the pipeline's exact kernels
    plain = {"fused_geglu": False, "constant_negative": False, "fused_norms": False}
    got = {"fp16 eager": images("float16", False, pipeline_vae, **plain),
           "fp16 graph": images("float16", True, pipeline_vae, **plain),
           "fp16 graph, fused geglu": images("float16", True, pipeline_vae, constant_negative=False,
                                             fused_norms=False),
           "fp16 graph, constant negative": images("float16", True, pipeline_vae, fused_geglu=False,
                                                   fused_norms=False),
           "fp16 graph, fused norms": images("float16", True, pipeline_vae, fused_geglu=False,
                                             constant_negative=False),
           "fp16 graph, fused norms, nhwc": images("float16", True, pipeline_vae, fused_geglu=False,
                                                   constant_negative=False, channels_last=True),
           "fp16 graph, short last batch": images("float16", True, pipeline_vae, batch_size=2, **plain),
           "default": images(None, True), "bf16": images("bfloat16", True, "bfloat16", **plain),
           "fp16 compiled blocks": images("float16", True, pipeline_vae, compile_blocks=True),
           "fp16 graph, parked encoders": images("float16", True, pipeline_vae, park_text_encoders=True, **plain)}
    gap = {k: (x - ref).abs().mean().item() for k, x in got.items()}
    replay = (got["fp16 graph"] - got["fp16 eager"]).abs().max().item()
    print(f"prior sampler on GPU: mean |image - pipeline fp16| {gap}; graph vs eager max {replay}")
    assert replay < 2e-2  # the same kernels, replayed
    # two seeds replayed (the first step the capture's warm-up), the third eagerly at batch 1
    assert (got["fp16 graph, short last batch"] - got["fp16 eager"]).abs().max().item() < 2e-2
    assert gap["fp16 graph"] < 1e-3  # the pipeline's own dtypes: the same images
    # the one-kernel GEGLU (the default on a GPU) rounds once where diffusers' rounds twice: fp16 rounding, far
    # below bf16's drift of this random-weight trajectory (0.19)
    assert gap["fp16 graph, fused geglu"] < 2e-2
    # the zeroed negative's cross-attentions filled in (zero_negative.py): the same sums over half the GEMM rows
    assert gap["fp16 graph, constant negative"] < 2e-2
    # the GroupNorms as Triton kernels, the resnet's add and SiLU fused (fused_norms.py), in NCHW and in NHWC:
    # one rounding where diffusers rounds after each op
    assert gap["fp16 graph, fused norms"] < 2e-2 and gap["fp16 graph, fused norms, nhwc"] < 2e-2
    # encoders parked on the CPU between prompts: the same encoding kernels on the GPU, the same images
    assert (got["fp16 graph, parked encoders"] - got["fp16 graph"]).abs().max().item() < 2e-2
    # Inductor's fused kernels inside the captured graph: they replay (images() asserts no fallback to eager)
    # and draw an image, not NaN or a flat field
    compiled = got["fp16 compiled blocks"]
    assert torch.isfinite(compiled).all() and compiled.std() > 0.01
