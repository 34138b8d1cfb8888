"""Build the training step's Triton kernels on a thread while the fit encodes its cache (issue 26: start-up).

Why: on a fresh machine Triton builds each kernel specialisation at its first launch, 0.15–0.2 s each, one after
another inside training's first step: the fused GroupNorms' forward and backward at every (channels, add, SiLU)
combination, and GEGLU's backward. The whole run's first step took 8.0 s with Triton's disk cache cold and 2.4 s
with it warm (BENCHMARKS.md 2026-12-07, session 9, H100). Triton's ``JITFunction.warmup`` builds a kernel for the
dtypes, alignments and integer sizes of its arguments without launching it, and the kernel modules do that for
meta tensors (their ``_run``). So :func:`warm` calls them with meta tensors of each fused norm's and GEGLU's shape,
at every latent size the data trains at, in the step's dtype and layout; the module starts it on a thread once its
adapters are in (``configure_model``), builds several at once where Triton has ``AsyncCompileMode`` (3.4 on: a
pool of threads), the main thread encodes the cache on the GPU meanwhile, and the thread is joined before the first
step. Nothing here launches a kernel, allocates device memory or touches a stream, so a
CUDA graph being captured is not disturbed; a specialisation missed here is built at its first launch, as before.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional

import torch


@dataclass(frozen=True)
class NormCall:
    """One kind of fused GroupNorm call (fused_norms.py): what decides which kernels it builds, sizes aside."""

    channels: int
    groups: int
    affine: bool
    add: bool  # a resnet's norm2: its ``+ temb`` fused in
    silu: bool


def norm_calls(unet: torch.nn.Module) -> set[NormCall]:
    """The fused norm calls of ``unet`` (after ``fuse_norms``): each fused resnet's two, and each other GroupNorm
    routed through the kernels (a transformer's input norm, the output norm)."""
    from diffusers.models.resnet import ResnetBlock2D

    from . import fused_norms

    def patched(m, func) -> bool:
        return getattr(vars(m).get("forward"), "__func__", None) is func

    calls, in_resnets = set(), set()
    for m in unet.modules():
        # fuse_norms routed each such resnet through its fused forward (which checkpointing may wrap since)
        if type(m) is ResnetBlock2D and fused_norms._fusable(m) and patched(m.norm1, fused_norms._group_norm_forward):
            in_resnets.update((id(m.norm1), id(m.norm2)))  # called by the resnet, never as modules
            calls.add(NormCall(m.norm1.num_channels, m.norm1.num_groups, m.norm1.affine, False, True))
            calls.add(NormCall(m.norm2.num_channels, m.norm2.num_groups, m.norm2.affine,
                               m.time_emb_proj is not None, True))
    for m in unet.modules():
        if patched(m, fused_norms._group_norm_forward) and id(m) not in in_resnets:
            calls.add(NormCall(m.num_channels, m.num_groups, m.affine, False, False))
    return calls


def geglu_widths(unet: torch.nn.Module) -> set[int]:
    """The activation widths of ``unet``'s GEGLUs that run the one-kernel activation (block_ops.fuse_geglu)."""
    from . import block_ops

    return {m.proj.out_features // 2 for m in unet.modules()
            if getattr(vars(m).get("forward"), "__func__", None) is block_ops._geglu_forward}


def fp8_calls(unet: torch.nn.Module) -> set[tuple[str, int]]:
    """The float8 draw's quantization kernels (fp8_quant_kernel.py) ``unet`` launches, by kind and row width:
    ``("rows", K)`` for each float8 layer that quantizes its own input (fp8_gemm.py), and for each fused block
    (fp8_block.py) ``("norm", K)``, ``("norm+add", K)`` for its LayerNorms and ``("geglu", K)`` for its activation,
    whose codes its other layers read; a compiled block launches none (its quantization is Inductor's)."""
    from . import fp8_block
    from .fp8_gemm import Fp8Linear

    calls, in_blocks = set(), set()
    for block in unet.modules():
        if type(block).__name__ != "BasicTransformerBlock":
            continue
        layers = [m for m in block.modules() if isinstance(m, Fp8Linear)]
        in_blocks.update(map(id, layers))
        if getattr(block, "_compiled_call_impl", None) is not None:
            continue
        if getattr(vars(block).get("forward"), "__func__", None) is fp8_block._forward:
            k = block.norm1.normalized_shape[0]
            calls |= {("norm", k), ("norm+add", k), ("geglu", block.ff.net[0].proj.out_features // 2)}
            # the layers that still read a half-precision tensor: the attentions' outputs, the text states
            layers = [block.attn1.to_out[0], block.attn2.to_k, block.attn2.to_v, block.attn2.to_out[0]]
        calls |= {("rows", m.in_features) for m in layers if isinstance(m, Fp8Linear)}
    return calls | {("rows", m.in_features) for m in unet.modules()
                    if isinstance(m, Fp8Linear) and id(m) not in in_blocks}  # proj_in, proj_out


def latent_sizes(images: Iterable[tuple[int, int]], levels: int) -> set[tuple[int, int]]:
    """The UNet's map sizes for images of these (height, width): the latents (1/8) and each stride-2 level below."""
    sizes = set()
    for h, w in images:
        h, w = h // 8, w // 8
        for _ in range(levels):
            sizes.add((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2  # a 3x3 stride-2 convolution with padding 1
    return sizes


Group = tuple  # (norms, widths, sizes, dtype, channels_last): :func:`warm`'s first five arguments


def warm(norms: set[NormCall], widths: set[int], sizes: set[tuple[int, int]], dtype: torch.dtype,
         channels_last: bool, backward: bool = True, workers: int = 1) -> int:
    """Build the kernels that these calls would launch (forward, and with ``backward`` the input's gradient) for
    one image at each map size; returns the number of kernel calls made. Needs Triton and a current CUDA device.

    Args:
        norms: :func:`norm_calls`.
        widths: :func:`geglu_widths`.
        sizes: the map sizes (:func:`latent_sizes`).
        dtype: the activations' dtype in the step (the frozen base's, under mixed precision).
        channels_last: the UNet runs NHWC (``perf.channels_last``): the norms see NHWC inputs and gradients.
        backward: also build the gradients' kernels (a training step; not an inference pass).
        workers: build this many at once (Triton's ``AsyncCompileMode``, a pool of threads: its compiler releases
            the GIL), where this Triton has it; 1 builds them one after another.
    """
    return warm_all([(norms, widths, sizes, dtype, channels_last)], backward, workers)


def warm_all(groups: Iterable[Group], backward: bool = True, workers: int = 1,
             fp8: Optional[tuple[set[tuple[str, int]], torch.dtype]] = None) -> int:
    """:func:`warm` for several groups of calls in one pool (a prior draw's UNet and VAE, each in its own dtype and
    layout), and a float8 draw's quantization kernels (``fp8``: :func:`fp8_calls` and the activations' dtype);
    returns the number of kernel calls made."""
    import triton

    groups = list(groups)

    def build() -> int:
        return sum(_warm(*g, backward) for g in groups) + (_warm_fp8(*fp8) if fp8 else 0)

    mode = getattr(triton, "AsyncCompileMode", None) if workers > 1 else None
    if mode is None:
        return build()
    with ThreadPoolExecutor(workers, thread_name_prefix="kernel-build") as pool, mode(pool):
        return build()  # (the mode's exit waits for the builds)


def _warm_fp8(calls: set[tuple[str, int]], dtype: torch.dtype) -> int:
    from . import fp8_quant_kernel as kernel

    for kind, k in sorted(calls):
        x = torch.empty(1, k, device="meta", dtype=dtype)
        if kind == "rows":
            kernel.quantize_rows(x)
        elif kind == "geglu":
            kernel.gated_gelu_rows(x, x)
        else:
            w = torch.empty(k, device="meta", dtype=dtype)
            kernel.layer_norm_rows(x, x if kind == "norm+add" else None, w, w, 1e-5)
    return len(calls)


def failure(err: Exception) -> str:
    """A failed warm-up in one line for its warning: the error's type and its message's first line."""
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {first}"


def default_workers() -> int:
    """Builds at once: up to 8, a core left to the main thread."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def draw_groups(unet: torch.nn.Module, vae: Optional[torch.nn.Module], image: tuple[int, int], unet_dtype: torch.dtype,
                vae_dtype: torch.dtype, channels_last: bool, norms: bool, geglu: bool) -> list[Group]:
    """What a prior draw of ``image`` (height, width) launches: the UNet's fused norms and GEGLUs at its latent
    sizes, in its dtype and layout, and the VAE decoder's fused norms at each size from the latent up to the image,
    in both layouts. ``norms``/``geglu``: whether those run as kernels (the sampler's switches)."""
    levels = len(getattr(getattr(unet, "config", None), "block_out_channels", (0, 0, 0)))
    groups = [(norm_calls(unet) if norms else set(), geglu_widths(unet) if geglu else set(),
               latent_sizes({image}, levels), unet_dtype, channels_last)]
    decoder = getattr(vae, "decoder", None)
    if norms and decoder is not None:
        h, w = image[0] // 8, image[1] // 8
        ups = len(getattr(vae.config, "block_out_channels", (0,)))
        calls, sizes = norm_calls(decoder), {(h << k, w << k) for k in range(ups)}
        # both layouts: the mid-block attention hands its output on as a transposed view, NHWC in all but name, and
        # the convolutions after it keep that layout
        groups += [(calls, set(), sizes, vae_dtype, False), (calls, set(), sizes, vae_dtype, True)]
    return [g for g in groups if g[0] or g[1]]


def _warm(norms: set[NormCall], widths: set[int], sizes: set[tuple[int, int]], dtype: torch.dtype,
          channels_last: bool, backward: bool) -> int:
    from . import geglu_kernel, group_norm_kernel

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    count = 0
    for (h, w) in sorted(sizes):
        for c in sorted(norms, key=lambda c: (c.channels, c.add, c.silu, c.affine)):
            x = torch.empty(1, c.channels, h, w, device="meta", dtype=dtype).contiguous(memory_format=fmt)
            add = torch.empty(1, c.channels, device="meta", dtype=dtype) if c.add else None
            weight = torch.empty(c.channels, device="meta", dtype=dtype) if c.affine else None
            bias = torch.empty_like(weight) if c.affine else None
            _, gmean, rstd = group_norm_kernel.forward(x, c.groups, weight, bias, 1e-5, add, c.silu)
            count += 3
            # the gradient comes in x's layout from a convolution; a plain norm's (a transformer's input norm) comes
            # back through proj_in's (N, H·W, C) view: NHWC whatever x's layout
            grads = (fmt,) if c.add or c.silu or channels_last else (fmt, torch.channels_last)
            for grad_fmt in grads if backward else ():
                dy = torch.empty_like(x, memory_format=grad_fmt)
                group_norm_kernel.backward(dy, x, c.groups, weight, bias, add, c.silu, gmean, rstd)
                count += 2
        for width in sorted(widths):
            a, g = (torch.empty(1, h * w, width, device="meta", dtype=dtype) for _ in range(2))
            geglu_kernel.forward(a, g)
            count += 1
            if backward:
                geglu_kernel.backward(torch.empty_like(a), a, g)
                count += 1
    return count


class KernelWarmup:
    """:func:`warm` on a daemon thread for one device; :meth:`join` waits for it; ``seconds`` (the build's wall
    time), ``calls`` and ``error`` say how it went.

    Args:
        norms, widths, sizes, dtype, channels_last: :func:`warm`'s.
        device: the CUDA device whose kernels are built (the thread makes it current: Triton builds for it).
    """

    def __init__(self, norms: set[NormCall], widths: set[int], sizes: set[tuple[int, int]], dtype: torch.dtype,
                 channels_last: bool, device: torch.device):
        self._args = (norms, widths, sizes, dtype, channels_last)
        if device.index is None and torch.cuda.is_available():  # "cuda": the caller's device (a thread starts on 0)
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.seconds, self.calls, self.error = device, 0.0, 0, None
        self._thread = threading.Thread(target=self._run, name="kernel-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            torch.cuda.set_device(self.device)  # a new thread starts on device 0; a DDP rank builds for its own
            self.calls = warm(*self._args, workers=default_workers())  # (the main thread encodes the cache meanwhile)
        except Exception as err:  # only time is at stake: every kernel still builds at its first launch
            self.error = failure(err)
        self.seconds = time.perf_counter() - t

    def join(self) -> float:
        """Wait for the thread; returns the seconds waited."""
        t = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - t


def kernels() -> list:
    """The Triton kernels :func:`warm_all` builds (the fused norms' five, GEGLU's two, the float8 draw's three)."""
    from . import fp8_quant_kernel, geglu_kernel, group_norm_kernel

    return [getattr(group_norm_kernel, n) for n in ("_partial_stats", "_group_stats", "_apply", "_grad_partial",
                                                   "_grad_apply")] + [
        geglu_kernel._forward_kernel, geglu_kernel._backward_kernel, fp8_quant_kernel._quantize_rows_kernel,
        fp8_quant_kernel._layer_norm_rows_kernel, fp8_quant_kernel._gated_gelu_rows_kernel]


def built(device: torch.device) -> int:
    """How many specialisations of :func:`kernels` this process holds for ``device`` (Triton's in-memory cache):
    their growth over the first step counts the builds the warm-up missed."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    # (a defaultdict: membership first, so that counting creates nothing)
    return sum(len(k.device_caches[index][0]) for k in kernels() if index in getattr(k, "device_caches", {}))


def train_images(datamodule) -> set[tuple[int, int]]:
    """The (height, width) of the images a fit's steps see: each aspect bucket, else the square resolution."""
    buckets = getattr(datamodule, "buckets", None)
    if buckets:
        return set(buckets.values())
    side = datamodule.shape().resolution if hasattr(datamodule, "shape") else 1024
    return {(side, side)}


def start(unet: torch.nn.Module, images: Iterable[tuple[int, int]], dtype: torch.dtype, channels_last: bool,
          device: Optional[torch.device]) -> Optional[KernelWarmup]:
    """A :class:`KernelWarmup` where the step will launch Triton kernels on ``device`` (a GPU with Triton, fused
    norms or the GEGLU kernel in the UNet); None where there is nothing to build."""
    from . import block_ops, fused_norms

    if device is None or device.type != "cuda":
        return None
    norms = norm_calls(unet) if fused_norms.uses_kernel(device) else set()
    widths = geglu_widths(unet) if block_ops.uses_kernel(device) else set()
    if not norms and not widths:
        return None
    levels = len(getattr(getattr(unet, "config", None), "block_out_channels", (0, 0, 0)))
    return KernelWarmup(norms, widths, latent_sizes(images, levels), dtype, channels_last, device)
