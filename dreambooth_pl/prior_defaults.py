"""What the prior sampler (prior_sampler.py) picks for a device when not told: its dtypes, its GEGLU, and whether
it reads the VAE straight into its decode dtype. The prior cache keys on the last two (data/class_images.py), so
one rule serves the sampler and the key.
"""
from __future__ import annotations

from typing import Optional

import torch

from .sdxl import has_bf16


def default_dtype(device: torch.device) -> str:
    """The UNet's and text encoders' dtype: the pipeline's fp16 on a GPU (the same images), fp32 on a CPU."""
    return "float16" if device.type == "cuda" else "float32"


def sampler_device(device: Optional[str]) -> torch.device:
    """Where a :class:`PriorSampler` draws: ``device``, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_fused_geglu(device: torch.device, compile_blocks: bool, base_dtype: str) -> bool:
    """Whether the sampler fuses its GEGLUs by default: on a GPU, with an fp16 base and no compiled blocks (which
    fuse it themselves; a quantized base's projections are not plain linears). The prior cache keys on it."""
    from .block_ops import uses_kernel

    return uses_kernel(device) and not compile_blocks and base_dtype == "float16"


def fused_geglu_for(asked: Optional[bool], device: torch.device, compile_blocks: bool, base_dtype: str) -> bool:
    """Whether a sampler runs the one-kernel GEGLU: ``asked``, else :func:`default_fused_geglu` (one rule for the
    sampler and the prior cache's key)."""
    return default_fused_geglu(device, compile_blocks, base_dtype) if asked is None else asked


def fused_norms_for(asked: Optional[bool], device: torch.device, compile_blocks: bool) -> bool:
    """Whether a sampler runs its GroupNorms as fused_norms.py's Triton kernels: ``asked``, else on a GPU with
    Triton and no compiled blocks (which fuse the norms themselves). One rule for the sampler and the prior cache."""
    from .fused_norms import uses_kernel

    # asked for where the kernels cannot run, the patched modules run diffusers' ops: the key says what ran
    return uses_kernel(device) and (not compile_blocks if asked is None else asked)


def channels_last_for(asked: Optional[bool], device: torch.device, fused_norms: bool) -> bool:
    """Whether a sampler draws with the UNet in NHWC: ``asked``, else where the fused norms run on a GPU (0.807
    against 0.835 s/image NCHW, H100, BENCHMARKS.md 2026-12-07 session 8; without them NHWC was slower, 1.084
    against 1.009, PyTorch's GroupNorm copying to NCHW). One rule for the sampler and the prior cache."""
    return device.type == "cuda" and (fused_norms if asked is None else asked)


def fp8_gemms_for(asked: bool, device: torch.device, base_dtype: str) -> bool:
    """Whether a sampler that is ``asked`` for float8 GEMMs runs them (fp8_gemm.py): on a device with float8
    tensor cores (or a CPU, the tests) and an unquantized base. One rule for the sampler and the prior cache."""
    from .fp8_gemm import supported

    return asked and base_dtype == "float16" and supported(device)


def default_vae_dtype(device: torch.device, dtype: str) -> str:
    """The VAE's: bf16 where the GPU has it (fp32's range, no overflow, tensor cores), else ``dtype`` (an fp16 SDXL
    VAE is then upcast to fp32, as the pipeline does)."""
    return "bfloat16" if has_bf16(device) else dtype


def reads_vae_direct(device: torch.device, dtype: Optional[str], vae_dtype: Optional[str], base_dtype: str,
                     park_text_encoders: bool) -> bool:
    """Whether the sampler reads the VAE from its files straight into a decode dtype other than the UNet's (bf16
    GPU draws since 2026-12-06 session 5, which hand the VAE to training), where it went through the UNet's fp16
    before: an fp32 VAE file then rounds once, not twice, so the prior cache keys on it."""
    dtype = dtype or default_dtype(device)
    return base_dtype == "float16" and not park_text_encoders and \
        (vae_dtype or default_vae_dtype(device, dtype)) != dtype
