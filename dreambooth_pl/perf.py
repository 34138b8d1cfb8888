"""Speed and memory switches for the frozen-base LoRA step: attention backend, channels_last, regional
torch.compile, gradient checkpointing of every k-th block, and LoRA input casting under autocast.

Each helper is independent and leaves the maths unchanged (up to floating-point order); the module applies
them in ``configure_model`` and the benchmark measures them (BENCHMARKS.md, docs/performance.md).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Literal, Sequence

import torch

Attention = Literal["auto", "flash", "cudnn", "efficient", "math"]
# Blocks repeated along the SDXL UNet (70 transformer blocks, 22 resnets) and the CLIP text towers (44 layers):
# compiling one instance compiles every instance of the same shapes, so compile time stays short.
BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")
CHECKPOINT_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def attention_context(backend: Attention = "auto"):
    """A context that puts one ``F.scaled_dot_product_attention`` kernel family first ("auto": PyTorch's order);
    where it does not apply (a CPU, a shape it lacks), the others follow in PyTorch's order instead of an error.

    Args:
        backend: ``flash`` (FlashAttention-2), ``cudnn`` (cuDNN fused attention), ``efficient`` (xFormers-style
            memory-efficient kernel), ``math`` (reference), or ``auto``.
    """
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if backend not in names:
        raise ValueError(f"attention backend {backend!r} is not one of {['auto', *names]}")
    order = [names[backend], *(b for b in names.values() if b != names[backend])]
    return sdpa_kernel(order, set_priority=True)


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store 4-D conv weights NHWC, the layout tensor-core convolutions run natively (no transposes)."""
    return model.to(memory_format=torch.channels_last)


def blocks_of(model: torch.nn.Module, types: Sequence[str] = BLOCKS) -> list[torch.nn.Module]:
    """Sub-modules whose class name is in ``types``, in definition order."""
    return [m for m in model.modules() if type(m).__name__ in types]


def compile_blocks(model: torch.nn.Module, types: Sequence[str] = BLOCKS, **compile_kwargs) -> int:
    """Regional compilation: ``torch.compile`` each repeated block instead of the whole model.

    Args:
        model: the UNet or a text encoder.
        types: class names of the blocks to compile.
        compile_kwargs: passed to ``nn.Module.compile`` (e.g. ``mode``, ``fullgraph``).
    Returns the number of blocks compiled. Same-shaped instances share one graph (parameters are graph inputs),
    so SDXL needs a handful of compilations instead of one 5-minute whole-UNet compile; diffusers'
    ``compile_repeated_blocks`` does the same for the transformer blocks alone.
    """
    import torch._dynamo

    # one graph per distinct block shape: SDXL has ~10 (3 levels x down/mid/up, with and without skip concat)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = blocks_of(model, types)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def _checkpointed(forward, preserve_rng_state: bool = True):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs)

    run.checkpointed = True
    return run


def set_checkpointing(unet: torch.nn.Module, every: int = 1, types: Sequence[str] = CHECKPOINT_BLOCKS,
                      preserve_rng_state: bool = True) -> int:
    """Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174) of all or every k-th block.

    Args:
        unet: a diffusers model.
        every: 0 = off; 1 = diffusers' own checkpointing of every block; k > 1 = recompute only every k-th
            block of ``types`` (memory falls roughly by (k-1)/k of the block activations, recompute time by 1/k).
        types: class names of the blocks that may be recomputed.
        preserve_rng_state: replay the forward's RNG in the recompute; needed only when the blocks draw random
            numbers (adapter dropout), and it reads the CUDA RNG state, which a CUDA-graph capture cannot.
    Returns the number of blocks recomputed in backward.
    """
    if every < 0:
        raise ValueError(f"checkpoint every must be >= 0 (0 = off), got {every}")
    for m in blocks_of(unet, types):  # undo an earlier every-k setting
        if getattr(m.forward, "checkpointed", False):
            del m.forward
    if every == 1:
        from torch.utils.checkpoint import checkpoint

        def func(module, *args):  # diffusers' default, with the RNG choice made explicit
            return checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)

        unet.enable_gradient_checkpointing(func)
        return len(blocks_of(unet, types))
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    if every == 0:
        return 0
    chosen = blocks_of(unet, types)[every - 1::every]
    for m in chosen:  # instance attribute: the class's forward stays untouched for other instances
        m.forward = _checkpointed(m.forward, preserve_rng_state)
    return len(chosen)


def keep_lora_inputs_half(model: torch.nn.Module) -> int:
    """Stop peft casting each adapter's input to the adapters' fp32 dtype; autocast then runs the rank-r
    matmuls in half precision with cached weight casts (removes one cast copy per adapter per pass).

    Use only under autocast (16-mixed / bf16-mixed): without it fp32 adapters would see half inputs.
    Returns the number of adapted layers changed.
    """
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def ddp_ignore_frozen(model: torch.nn.Module) -> int:
    """Tell DistributedDataParallel to leave the frozen base alone: no start-up broadcast of its billions of
    weights, and no per-step buffer broadcast (input caching parks the VAE and text encoders on the CPU, where
    NCCL cannot reach their buffers). Only the adapters are synchronised and all-reduced, so DDP needs no
    strategy flag (``broadcast_buffers: false``) with caching on.

    Uses torch's ``_ddp_params_and_buffers_to_ignore``, which Lightning's DDPStrategy honours (it wraps the
    LightningModule itself). Returns the number of names ignored.
    """
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    names += [n for n, _ in model.named_buffers()]
    model._ddp_params_and_buffers_to_ignore = names
    return len(names)


def fuse_attention(unet) -> int:
    """Fuse the UNet's attention projections with diffusers' ``fuse_qkv_projections`` and drop the separate ones
    its fused processor no longer calls (q/k/v in self-attention, k/v in cross-attention; q stays there); returns the
    parameters freed. A later call on a dropped projection fails loudly (AttributeError), never silently."""
    from diffusers.models.attention_processor import Attention

    unet.fuse_qkv_projections()
    freed = 0
    for attn in (m for m in unet.modules() if isinstance(m, Attention)):
        for name in ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v"):
            freed += sum(p.numel() for p in getattr(attn, name).parameters())
            delattr(attn, name)
    unet.original_attn_processors = None  # they would call the dropped projections
    return freed
