"""The prior draw's speed-ups on a loaded SDXL pipeline: applied in their order, undone for training's handoff.

Each one changes how the UNet or VAE runs, not what they compute, beyond rounding (the prior cache keys those
that round differently; BENCHMARKS.md times each, ``benchmark --preset priors --variants``):
- each GEGLU (``fused_geglu``, the default on a GPU with Triton and an fp16 base) runs as two GEMMs and one Triton
  ``a · gelu(g)`` kernel (``block_ops.fuse_geglu``) where diffusers runs two strided kernels (211 of a batch's 1431
  GPU ms, H100 profile, BENCHMARKS.md 2026-12-06 session 3): 0.946 against 1.017 s/image (session 4);
- the GroupNorms run as Triton kernels that keep the input's layout, each resnet's ``+ temb``, norm and SiLU in
  one (``fused_norms``, the default on a GPU with Triton; fused_norms.py), and the UNet runs NHWC with them
  (``channels_last``: 0.807 against 0.835 s/image NCHW on an H100; alone it lost, 1.084 against 1.009, while
  PyTorch's GroupNorm copied NHWC to NCHW around every norm), and the VAE decodes NHWC with it
  (``vae_channels_last``: its convolutions at up to 1024² over 128 channels without transposes);
- ``fp8_gemms`` (opt-in): the transformers' linears as row-wise scaled float8 GEMMs (fp8_gemm.py) on a GPU with
  float8 tensor cores, whose blocks' norms and GEGLU then write the codes themselves (fp8_block.py): other images
  of the same prompt, not the pipeline's;
- each attention skips diffusers' division of its output by ``rescale_output_factor``, 1 in SDXL
  (``plain_attention``, plain_attention.py): the same bits, a pass fewer per attention;
- with no negative prompt the guided batch's negative half has all-zero text embeddings, so every cross-attention
  there returns its output bias: that half is filled with it instead of computed (``constant_negative``,
  zero_negative.py; ~3.5 % of a guided UNet forward's FLOPs);
- ``compile_blocks`` (opt-in): regional ``torch.compile`` of the transformer and resnet blocks (0.881 s/image but
  a 22 s first batch on an H100).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import fp8_block
from .block_ops import fuse_geglu
from .fused_norms import fuse_norms, to_nhwc
from .perf import compile_blocks as compile_regions
from .plain_attention import use_plain_attention
from .prior_defaults import channels_last_for, fp8_gemms_for, fused_geglu_for, fused_norms_for
from .zero_negative import ConstantNegative

UNET_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")  # the UNet's repeated blocks (perf.BLOCKS less CLIP's)


@dataclass
class Speedups:
    """What :func:`apply` turned on: flags, or how many modules changed (0: off)."""

    fused_geglu: bool
    fused_norms: bool
    channels_last: bool
    vae_channels_last: bool
    fp8_gemms: int
    plain_attention: int
    constant: Optional[ConstantNegative]
    fp8_fused_blocks: int
    compiled_blocks: int

    def runtime(self) -> dict:
        """The switches as the sampler's ``runtime()`` and the class PNGs record them."""
        return dict(compiled_blocks=self.compiled_blocks, fused_geglu=self.fused_geglu, fused_norms=self.fused_norms,
                    channels_last=self.channels_last, vae_channels_last=self.vae_channels_last,
                    plain_attention_layers=self.plain_attention, fp8_gemm_layers=self.fp8_gemms,
                    fp8_fused_blocks=self.fp8_fused_blocks,
                    constant_negative_layers=self.constant.layers if self.constant is not None else 0)


def apply(pipe, device: torch.device, base_dtype: str, fused_geglu: Optional[bool], fused_norms: Optional[bool],
          channels_last: Optional[bool], vae_channels_last: Optional[bool], fp8_gemms: bool, fp8_fused_blocks: bool,
          plain_attention: bool, constant_negative: bool, compile_blocks: bool, backend="inductor") -> Speedups:
    """Turn the draw's speed-ups on for ``pipe`` (on ``device``), in the order they need, and say which ran.

    Args:
        pipe: the loaded ``StableDiffusionXLPipeline``.
        device: where it draws.
        base_dtype: the UNet's linears' storage (``float16``, or quant.py's ``float8``/``nf4``).
        fused_geglu, fused_norms, channels_last: None: ``prior_defaults``' choice for the device.
        vae_channels_last: None: as ``channels_last``.
        fp8_gemms, fp8_fused_blocks, plain_attention, constant_negative, compile_blocks: on or off.
        backend: ``torch.compile``'s backend for ``compile_blocks``.
    """
    unet = pipe.unet
    # the GEGLU before compile_blocks, whose graphs then trace the split GEGLU (Inductor fuses it there anyway)
    geglu = fused_geglu_for(fused_geglu, device, compile_blocks, base_dtype)
    if geglu:
        fuse_geglu(unet)
    norms = fused_norms_for(fused_norms, device, compile_blocks)
    if norms:
        fuse_norms(unet)
        fuse_norms(pipe.vae)
    nhwc = channels_last_for(channels_last, device, norms)
    if nhwc:
        to_nhwc(unet)
    vae_nhwc = nhwc if vae_channels_last is None else vae_channels_last and device.type == "cuda"
    if vae_nhwc:  # the decode's convolutions at up to 1024² over 128 channels, without transposes
        to_nhwc(pipe.vae)
    fp8 = 0
    if fp8_gemms:
        from . import fp8_gemm

        if fp8_gemms_for(fp8_gemms, device, base_dtype):
            # (a parked load comes from from_pretrained with gradients on; to_fp8 takes frozen layers only)
            fp8 = fp8_gemm.to_fp8(unet.requires_grad_(False))
        else:
            warnings.warn("prior sampler: fp8_gemms needs a GPU with float8 tensor cores (compute capability "
                          "8.9+) and an unquantized base; drawing in half precision.", stacklevel=3)
    # plain attention before the constant negative, which wraps each cross-attention's processor; the fused float8
    # blocks after both and the float8 layers, which each block checks at its calls
    plain = use_plain_attention(unet) if plain_attention else 0
    constant = ConstantNegative(unet) if constant_negative else None
    fused_blocks = fp8_block.fuse(unet) if fp8 and fp8_fused_blocks else 0
    compiled = compile_regions(unet, UNET_BLOCKS, dynamic=False, backend=backend) if compile_blocks else 0
    return Speedups(geglu, norms, nhwc, vae_nhwc, fp8, plain, constant, fused_blocks, compiled)


def undo(pipe, s: Speedups) -> None:
    """Give ``pipe``'s UNet and VAE back as loaded: every speed-up of ``s`` but compiled blocks undone (a compiled
    UNet is not handed on)."""
    from .block_ops import unfuse_blocks
    from .fp8_gemm import restore as restore_linears
    from .fused_norms import unfuse_norms
    from .plain_attention import restore

    if s.constant is not None:
        s.constant.remove()
        s.constant = None
    restore(pipe.unet)
    fp8_block.unfuse(pipe.unet)
    restore_linears(pipe.unet)  # the half-precision layers back; their float8 copies go with the wrappers
    unfuse_blocks(pipe.unet)
    unfuse_norms(pipe.unet)
    unfuse_norms(pipe.vae)
    if s.channels_last:
        to_nhwc(pipe.unet, on=False)
    if s.vae_channels_last:
        to_nhwc(pipe.vae, on=False)
