"""Fast class-prior sampling: one prompt, many seeds, in fixed-shape batches, the UNet replayed from a CUDA graph.

The images are diffusers' ``StableDiffusionXLPipeline``'s at the same seeds and settings: prompt encoding, initial
latents (one CPU generator per image), time ids, scheduler and guidance are the pipeline's own functions, called
once per batch; only the loop around the UNet is ours. What differs is how it runs:
- the prompt is encoded once; every full batch has one shape, so one CUDA graph of the UNet's forward is captured
  (its warm-up forward is the first step's) and replayed for every step of every batch; a short last batch runs
  eagerly at its own size (padding 197 priors to 200 drew three images only to drop them, ~2.8 s on an H200);
- the UNet and text encoders run in the pipeline's fp16 on a GPU (bf16 leaves its trajectory: 0.19 mean absolute
  difference in [0, 1] on the tiny random base, BENCHMARKS.md 2026-12-04); the VAE decodes in bf16 where the GPU
  has it (no fp16 overflow, which the pipeline avoids by upcasting to fp32), in batches, quantised to uint8 there;
- the UNet and VAE run with draw_speedups.py's switches (fused GEGLU and GroupNorms, NHWC, plain attention, the
  zeroed negative prompt's cross-attentions as their constant; opt-in float8 GEMMs and compiled blocks);
- other opt-in switches, timed by ``benchmark --preset priors`` (BENCHMARKS.md): ``fuse_qkv`` (diffusers' fused
  projections: 1.032 against 1.036 s/image, within noise), ``cudnn_benchmark``, and ``park_text_encoders`` (the
  encoders stay on the CPU but for the prompt: an 8 GB card, configs/perf/8gb.yaml);
- once a fit's draw is done, :meth:`PriorSampler.leave_base` hands the loaded parts to its training
  (base_handoff.py), which then does not read the base a second time.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Iterator, Optional, Sequence, get_args

import torch

from . import draw_speedups
from .graphs import GraphedForward
from .perf import Attention as AttentionKernel, attention_context, fuse_attention
from .prior_defaults import default_dtype, default_vae_dtype, sampler_device
from .sampling import SAMPLER, make_scheduler
from .sdxl import DTYPES, dtype_name, load_parts, load_vae, resolve_base, unscale_latents
from .zero_negative import is_zero

COMPILE_BACKEND = "inductor"  # torch.compile's backend for ``compile_blocks``; the CPU tests use a cheaper one


class PriorSampler:
    """SDXL sampling of one prompt over many seeds, batched and graph-replayed (see the module docstring).

    Args:
        base: SDXL pipeline folder or hub id.
        scheduler: a key of ``sampling.SCHEDULERS``.
        dtype: weights dtype of the UNet and text encoders (None: ``prior_defaults.default_dtype``).
        vae_dtype: the VAE's (None: ``prior_defaults.default_vae_dtype``).
        device: cuda, cpu, ... (None: CUDA when available).
        vae: a separate VAE folder.
        batch_size: images per UNet batch (a shorter last batch runs eagerly; with compiled blocks it is padded).
        graph: replay the UNet from a CUDA graph on a CUDA device (falls back to eager, with a warning, when the
            capture fails).
        decode_batch: latents per VAE decode call.
        base_dtype: the UNet's linears stored as ``float8`` or ``nf4`` (quant.py), quantised layer by layer on
            ``device`` from the copy loaded on the CPU, so the half-precision UNet never sits there whole (an 8 GB
            card); ``float16``: as loaded.
        vae_tiling: decode in overlapping tiles (less memory above the VAE's tile size).
        fuse_qkv: one GEMM for each attention's q/k/v (k/v in cross-attention); off with a quantized base, whose
            linears are no longer plain weights to concatenate.
        attention: the attention kernel put first (``perf.attention_context``; ``auto``: PyTorch's choice); the
            priors benchmark times ``cudnn`` against ``auto``.
        compile_blocks: compile the UNet's transformer and resnet blocks (see the module docstring).
        cudnn_benchmark: let cuDNN time its convolution algorithms once per shape (see the module docstring).
        park_text_encoders: keep the text encoders on the CPU except while encoding a prompt (see the module
            docstring); a no-op on a CPU device.
        fused_geglu: one compiled kernel for each GEGLU activation (see the module docstring; None:
            ``prior_defaults.default_fused_geglu``).
        constant_negative: the zeroed negative prompt's cross-attentions filled in as the constant they are
            (zero_negative.py; False: computed, as diffusers does).
        fused_norms: the UNet's and VAE's GroupNorms as Triton kernels, each resnet's ``+ temb``, norm and SiLU in
            one (fused_norms.py; None: ``prior_defaults.fused_norms_for``).
        channels_last: the UNet in NHWC on a GPU (None: ``prior_defaults.channels_last_for``, on with the fused
            norms, which keep NHWC through every norm).
        vae_channels_last: the VAE's decode in NHWC (None: as ``channels_last``; the priors benchmark's A/B).
        plain_attention: each plain attention without diffusers' division of its output by 1 (plain_attention.py:
            the same bits, one pass fewer per attention; False: diffusers' processor, for the benchmark's A/B).
        fp8_gemms: the UNet transformers' linears as float8 GEMMs with row-wise scales (fp8_gemm.py; compute
            capability 8.9 or a CPU; asked for elsewhere, a warning and fp16); with ``compile_blocks`` Inductor
            fuses each input's quantization into its producer.
        fp8_fused_blocks: with ``fp8_gemms``, each transformer block's norms and GEGLU write the float8 codes its
            GEMMs read, the norms with the attentions' residual adds (fp8_block.py: the same codes, less memory
            traffic; False: the unfused float8 draw, for the benchmark's A/B).
        warm_kernels: before an image size's first batch, build the draw's Triton kernels (fused norms, GEGLU,
            float8 quantization) in a pool (kernel_warmup.py) instead of one by one at their first launch; the same
            kernels run.
    """

    def __init__(self, base: str, scheduler: str = SAMPLER.scheduler, dtype: Optional[str] = None,
                 device: Optional[str] = None, vae: Optional[str] = None, batch_size: int = 8, graph: bool = True,
                 decode_batch: int = 4, vae_dtype: Optional[str] = None, base_dtype: str = "float16",
                 vae_tiling: bool = False, fuse_qkv: bool = False, attention: AttentionKernel = "auto",
                 compile_blocks: bool = False, cudnn_benchmark: bool = False, park_text_encoders: bool = False,
                 fused_geglu: Optional[bool] = None, constant_negative: bool = True,
                 fused_norms: Optional[bool] = None, channels_last: Optional[bool] = None,
                 plain_attention: bool = True, warm_kernels: bool = True, vae_channels_last: Optional[bool] = None,
                 fp8_gemms: bool = False, fp8_fused_blocks: bool = True):
        from diffusers import StableDiffusionXLPipeline

        if attention not in get_args(AttentionKernel):
            raise ValueError(f"attention is one of {get_args(AttentionKernel)}, got {attention!r}")
        self.device = sampler_device(device)
        dtype = dtype or default_dtype(self.device)
        if dtype == "float16" and self.device.type == "cpu":
            warnings.warn("float16 sampling on CPU is slow or unsupported; using float32.", stacklevel=2)
            dtype = "float32"
        self.dtype, self.batch_size, self.decode_batch = DTYPES[dtype], batch_size, max(1, decode_batch)
        vae_dtype = DTYPES[vae_dtype or default_vae_dtype(self.device, dtype)]
        self._base = None  # (root, vae, the VAE's load dtype) when load_parts read the parts (leave_base hands them on)
        if base_dtype == "float16" and not park_text_encoders:
            # each weight read from its file straight onto the device (sdxl.load_parts): the pipeline's own
            # loading builds every part on the host first (6.1 s against 3.2 s on an H100, BENCHMARKS.md
            # 2026-12-06); the VAE straight into its decode dtype (reads_vae_direct; an fp16 one is upcast below,
            # as the pipeline does). Quantizing and parking start from the pipeline's host copy.
            p = load_parts(base, vae, self.dtype, self.device, vae_dtype=vae_dtype)
            extra = dict(unet=p.unet, vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                         tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2)
            self._base = (resolve_base(base), vae, vae_dtype)
        else:
            extra = {"vae": load_vae(vae, self.dtype)} if vae else {}
        pipe = StableDiffusionXLPipeline.from_pretrained(resolve_base(base), dtype=self.dtype,
                                                         add_watermarker=False, **extra)
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        pipe.vae.to(vae_dtype)
        if pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)  # as the pipeline decodes: the SDXL VAE overflows to NaN in fp16
        pipe.set_progress_bar_config(disable=True)
        if vae_tiling:
            pipe.vae.enable_tiling()
        self.base_dtype = base_dtype
        self.fuse_qkv = fuse_qkv and base_dtype == "float16"
        if self.fuse_qkv:
            fuse_attention(pipe.unet)
        if base_dtype != "float16":
            from .quant import quantize_base

            quantize_base(pipe.unet.requires_grad_(False), base_dtype, self.dtype, self.device)
        self.park_text_encoders = park_text_encoders and self.device.type != "cpu"
        if self.park_text_encoders:  # the encoders never reach the device together with the UNet outside _encode
            pipe.unet.to(self.device)
            pipe.vae.to(self.device)
        else:
            pipe.to(self.device)
        self.pipe = pipe
        self.attention, self.cudnn_benchmark = attention, cudnn_benchmark
        self.speedups = draw_speedups.apply(
            pipe, self.device, base_dtype, fused_geglu=fused_geglu, fused_norms=fused_norms,
            channels_last=channels_last, vae_channels_last=vae_channels_last, fp8_gemms=fp8_gemms,
            fp8_fused_blocks=fp8_fused_blocks, plain_attention=plain_attention, constant_negative=constant_negative,
            compile_blocks=compile_blocks, backend=COMPILE_BACKEND)
        self._embeds: dict[tuple, tuple] = {}  # (prompt, negative, cfg) -> encode_prompt's four tensors
        self._zero_negative: dict[tuple, bool] = {}  # the same keys -> the negative embeddings are all zero
        self.graph = graph and self.device.type == "cuda"
        self._graphs: dict[tuple, GraphedForward] = {}
        sp = self.speedups
        self.warm_kernels = warm_kernels and self.device.type == "cuda" and \
            bool(sp.fused_norms or sp.fused_geglu or sp.fp8_gemms)
        self._warmed: set[tuple[int, int]] = set()  # image sizes whose kernels are built (_warm)
        self.kernel_build_s = 0.0

    def leave_base(self) -> bool:
        """Leave this sampler's frozen parts for the next ``sdxl.load_parts`` of the same base, dtype and device
        (base_handoff.py: a fit's training then skips its own load), restored to what ``load_parts`` returned; the
        sampler cannot draw after. False, leaving nothing, where the parts differ from a plain load: a quantized
        or parked base, fused q/k/v, compiled blocks; a VAE that was upcast or tiles stays out alone."""
        from . import base_handoff

        if self._base is None or self.pipe is None or self.fuse_qkv or self.speedups.compiled_blocks:
            return False  # (pipe None: left already)
        pipe, (root, vae, vae_loaded) = self.pipe, self._base
        self._graphs.clear()  # their pools and static buffers go back with the sampler's memory
        draw_speedups.undo(pipe, self.speedups)
        parts = {name: getattr(pipe, name) for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                                                         "unet")}
        if not pipe.vae.use_tiling and pipe.vae.dtype == vae_loaded:  # an upcast one holds fp16-rounded values
            parts["vae"] = pipe.vae
        base_handoff.leave({base_handoff.part_key(root, vae, name, getattr(m, "dtype", None),
                                                  self.device if hasattr(m, "dtype") else None): m
                            for name, m in parts.items()})
        self.pipe = None
        return True

    def runtime(self) -> dict:
        """What ran (``sampling.runtime``), plus the sampler's batching."""
        from .sampling import runtime

        return dict(runtime(self.pipe), sampler="prior_sampler", batch_size=self.batch_size,
                    vae_dtype=dtype_name(self.pipe.vae.dtype), base_dtype=self.base_dtype,
                    fuse_qkv=self.fuse_qkv, attention=self.attention, cudnn_benchmark=self.cudnn_benchmark,
                    park_text_encoders=self.park_text_encoders, **self.speedups.runtime())

    @contextlib.contextmanager
    def _cudnn(self):
        """cuDNN's benchmark mode as this sampler asks, restored after (a process-wide flag)."""
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before

    def _zero_rows(self, rows: int):
        """While inside, the first ``rows`` rows' cross-attentions are the constant (zero_negative.py)."""
        constant = self.speedups.constant
        return constant.zero_rows(rows) if constant is not None else contextlib.nullcontext()

    def _unet(self, x, t, embeds, text, time_ids, replay: bool = True, zero_rows: int = 0) -> torch.Tensor:
        """The UNet's noise prediction: replayed from the graph of ``x``'s shape (captured at its first call, whose
        output is the warm-up's), or eagerly (``replay`` False: a short last batch, not worth a capture).
        ``zero_rows``: how many leading rows of ``embeds`` are the zeroed negative prompt's (0: none known)."""
        if not (self.graph and replay):
            with attention_context(self.attention), self._zero_rows(zero_rows):
                return self.pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False,
                                      added_cond_kwargs={"text_embeds": text, "time_ids": time_ids})[0]
        key = (tuple(x.shape), x.dtype, zero_rows)  # a graph that skips the negative rows serves only such batches
        if key not in self._graphs:
            try:
                # the captured graph keeps the kernels and the rows chosen here
                with attention_context(self.attention), self._zero_rows(zero_rows):
                    self._graphs[key] = graphed = GraphedForward(self.pipe.unet, x, t, embeds, text, time_ids)
            except RuntimeError as err:  # a capture that fails must not cost the images: run eagerly
                warnings.warn(f"prior sampler: CUDA-graph capture failed ({str(err).splitlines()[0][:200]}); "
                              "the UNet runs eagerly.", stacklevel=2)
                self.graph = False
                return self._unet(x, t, embeds, text, time_ids, zero_rows=zero_rows)
            first, graphed.first = graphed.first, None
            return first
        return self._graphs[key](x, t, embeds, text, time_ids)

    def _warm(self, height: int, width: int) -> None:
        """Build the Triton kernels a draw of this size launches, several at once, before its first batch launches
        them one by one (on a fresh machine 0.15-0.2 s each; kernel_warmup.py). A failure only costs the time."""
        if not self.warm_kernels or (height, width) in self._warmed:
            return
        from . import kernel_warmup

        self._warmed.add((height, width))
        t, pipe = time.perf_counter(), self.pipe
        try:
            sp = self.speedups
            groups = kernel_warmup.draw_groups(pipe.unet, pipe.vae, (height, width), self.dtype, pipe.vae.dtype,
                                               sp.channels_last, sp.fused_norms, sp.fused_geglu)
            fp8 = (kernel_warmup.fp8_calls(pipe.unet), self.dtype) if sp.fp8_gemms else None
            with torch.cuda.device(self.device):  # Triton builds for the current device
                kernel_warmup.warm_all(groups, backward=False, workers=kernel_warmup.default_workers(), fp8=fp8)
        except Exception as err:  # every kernel still builds at its first launch
            warnings.warn(f"prior sampler: building the draw's Triton kernels ahead failed "
                          f"({kernel_warmup.failure(err)}); each builds at its first launch.", stacklevel=3)
        self.kernel_build_s += time.perf_counter() - t

    @torch.no_grad()
    def latents(self, prompt: str, seeds: Sequence[int], steps: int = SAMPLER.steps,
                guidance: float = SAMPLER.guidance, negative_prompt: Optional[str] = None, height: int = 1024,
                width: int = 1024) -> torch.Tensor:
        """Denoised latents ``[len(seeds), 4, h/8, w/8]`` of one batch (``len(seeds) <= batch_size``)."""
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

        pipe, n = self.pipe, len(seeds)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} seeds, got {n}")
        self._warm(height, width)
        # a short (last) batch runs eagerly at its own size: padding it would draw images only to drop them; but
        # compiled blocks would compile every block again for a new shape, so there it is padded, then dropped
        b = self.batch_size if self.speedups.compiled_blocks else n
        seeds = list(seeds) + [seeds[-1]] * (b - n)
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline decides
        embeds, neg, pooled, neg_pooled = self._encode(prompt, negative_prompt, cfg)
        # the rows the constant fills (0 without it: the graph key then says no row is skipped)
        zero_rows = b if cfg and self.speedups.constant is not None \
            and self._zero_negative[(prompt, negative_prompt, cfg)] else 0
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        if cfg:
            embeds, pooled, time_ids = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]), time_ids.repeat(2, 1)
        # negatives first, then positives, each repeated over the batch: the pipeline's [uncond x b; cond x b]
        embeds, pooled = embeds.repeat_interleave(b, 0), pooled.repeat_interleave(b, 0)
        time_ids = time_ids.to(self.device).repeat_interleave(b, 0)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, self.device)
        latents = pipe.prepare_latents(b, pipe.unet.config.in_channels, height, width, embeds.dtype, self.device,
                                       gens)
        extra = pipe.prepare_extra_step_kwargs(gens, 0.0)
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        with self._cudnn():
            latents = self._denoise(latents, timesteps, embeds, pooled, time_ids, guidance if cfg else None, extra,
                                    replay=b == self.batch_size, zero_rows=zero_rows)
        return latents[:n]

    def _encode(self, prompt: str, negative_prompt: Optional[str], cfg: bool) -> tuple:
        """The pipeline's ``encode_prompt`` of ``prompt``, computed once per (prompt, negative prompt, guidance on);
        with ``park_text_encoders`` the encoders visit the device for it and go back to the CPU after."""
        key = (prompt, negative_prompt, cfg)
        if key not in self._embeds:
            pipe = self.pipe
            encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None]
            if self.park_text_encoders:
                for m in encoders:
                    m.to(self.device)
            try:
                self._embeds[key] = pipe.encode_prompt(prompt, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=cfg,
                                                       negative_prompt=negative_prompt)
                neg = self._embeds[key][1]  # zeros where the pipeline zeroes an empty negative prompt
                self._zero_negative[key] = neg is not None and is_zero(neg)
            finally:
                if self.park_text_encoders:
                    for m in encoders:
                        m.to("cpu")
                    torch.cuda.empty_cache()  # their blocks go back to the card, not to the allocator's cache
        return self._embeds[key]

    def _denoise(self, latents, timesteps, embeds, pooled, time_ids, guidance: Optional[float], extra: dict,
                 replay: bool = True, zero_rows: int = 0):
        """The scheduler's loop around the UNet, with classifier-free guidance at ``guidance`` (None: off);
        ``zero_rows`` as :meth:`_unet`'s."""
        pipe, cfg = self.pipe, guidance is not None
        for t in timesteps:
            x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            pred = self._unet(x, t, embeds, pooled, time_ids, replay, zero_rows)
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            latents = pipe.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1] (float32), decoded in the VAE's dtype ``decode_batch`` at a time, then
        denormalised as the pipeline's image processor does (in the decode dtype)."""
        vae = self.pipe.vae
        latents = unscale_latents(latents.to(vae.dtype), vae.config)
        out = []
        with self._cudnn():
            for chunk in latents.split(self.decode_batch):
                image = vae.decode(chunk, return_dict=False)[0]
                out.append((image / 2 + 0.5).clamp(0, 1).float())
        return torch.cat(out)

    def images(self, prompt: str, seeds: Sequence[int], steps: int = SAMPLER.steps,
               guidance: float = SAMPLER.guidance, negative_prompt: Optional[str] = None, height: int = 1024,
               width: int = 1024) -> Iterator[tuple[int, "object"]]:
        """``(seed, PIL image)`` for every seed, a batch at a time; quantised to uint8 on the device as the
        pipeline's ``numpy_to_pil`` does (``round(x * 255)``), so one small copy per batch reaches the host."""
        from PIL import Image

        seeds = [int(s) for s in seeds]
        for start in range(0, len(seeds), self.batch_size):
            chunk = seeds[start:start + self.batch_size]
            pixels = self.decode(self.latents(prompt, chunk, steps, guidance, negative_prompt, height, width))
            arrays = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for seed, arr in zip(chunk, arrays):
                yield seed, Image.fromarray(arr)
