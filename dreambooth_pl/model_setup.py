"""What ``DreamBoothLoRA.configure_model`` wires: the base loaded in the training dtype with adapters injected and
the frozen linears stored as ``model.base_dtype`` says, the speed switches planned for the device and applied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import block_ops, fused_norms, plain_attention, quant
from . import perf as perf_lib
from .adapter import kinds
from .data.datamodule import DataShape
from .fused_lora import fuse_lora_layers
from .memory_plan import GIB, Target, budget, frozen_gib, resolve_perf
from .pivotal import PivotalTokens
from .sdxl import load_parts, vae_dtype_on
from .settings import PerfSettings


@dataclass
class Model:
    """The loaded parts: UNet and text encoders with adapters (frozen weights in the training dtype), VAE,
    tokenizers, the scheduler config and pivotal tuning's new tokens (or None)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizers: tuple
    scheduler_config: dict
    pivotal: Optional[PivotalTokens]


def load_model(hp, dtype: torch.dtype, device: Optional[torch.device]) -> Model:
    """The base of ``hp`` (the module's hyper-parameters) with adapters, each weight straight to ``device`` in
    ``dtype`` (start-up), the UNet's frozen linears quantized per ``hp.base_dtype`` (quant.py).

    Args:
        hp: ``DreamBoothLoRA.hparams``.
        dtype: the frozen base's dtype (``DreamBoothLoRA.weight_dtype``).
        device: the training device (None: the CPU).
    """
    # a quantized base loads on the CPU and its linears go to the device one by one, already quantized: the
    # half-precision UNet never sits on an 8 GB card whole
    where = device if hp.base_dtype == "float16" else None
    pivotal = hp.pivotal is not None  # its text encoders load in fp32 on the CPU: the script initialises there
    vae_dtype = vae_dtype_on(hp.vae_dtype, device)
    parts = load_parts(hp.base_model, hp.vae_model, dtype, where, vae_dtype, text_fp32_host=pivotal)
    tokens = None
    if pivotal:  # before the cast, on the fp32 tables, as the script's TokenEmbeddingsHandler
        tokens = PivotalTokens(hp.pivotal, (parts.tokenizer, parts.tokenizer_2),
                               (parts.text_encoder, parts.text_encoder_2), hp.seed)
    m = Model(parts.unet.to(dtype), parts.vae.to(vae_dtype),
              parts.text_encoder.to(device=where, dtype=dtype),  # no-ops unless pivotal loaded them
              parts.text_encoder_2.to(device=where, dtype=dtype), (parts.tokenizer, parts.tokenizer_2),
              parts.scheduler_config, tokens)
    if tokens is not None:
        tokens.attach()
    lora = hp.lora
    for model in (m.unet, *adapted_encoders(m, lora.train_text_encoder)):
        # the text encoders name their attention projections differently
        targets = lora.target_modules if model is m.unet else kinds.TEXT_TARGETS
        kinds.add_adapter(model, lora.adapter,
                          kinds.peft_config(lora.adapter, lora.rank, lora.alpha, lora.dropout, targets, lora.init))
    # quantized before the memory plan counts the UNet's bytes
    quant.quantize_base(m.unet, hp.base_dtype, dtype, device, bool(hp.perf.fused_lora))
    return m


def adapted_encoders(m, train_text_encoder: bool) -> tuple:
    """The text encoders that carry adapters (``lora.train_text_encoder``): checkpointed and compiled as the UNet."""
    return (m.text_encoder, m.text_encoder_2) if train_text_encoder else ()


def plan_perf(module, encoders: tuple) -> PerfSettings:
    """``model.perf`` resolved for the module's device, precision and data (memory_plan.resolve_perf); ``encoders``
    (the trained text encoders) count as resident weights.

    Args:
        module: the ``DreamBoothLoRA`` being configured.
        encoders: the text encoders that train (adapters, or pivotal tuning's rows): they stay on the GPU.
    """
    hp, trainer = module.hparams, module._trainer
    device = trainer.strategy.root_device if trainer is not None else module.device
    if hp.perf.memory_plan == "auto" and device.type != "cuda":
        rank_zero_warn(f"model.perf.memory_plan=auto plans GPU memory; on {device.type} the manual switches apply.")
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    shape = dm.shape() if dm is not None else DataShape()
    weights, storage = 0.0, None
    if device.type == "cuda":  # resident during the steps: the UNet (and trained text encoders), fp32 adapters
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        weights = frozen_gib(module.unet, *encoders) + trainable * 16 / GIB  # weight, grad, two moments
        storage = quant.storage_gib(module.unet, weights)  # what float8/nf4 would leave, for the plan's hint
    held = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
               if t.device.type == "cuda") / GIB  # loaded straight to the GPU: free memory already lacks them
    target = Target(device.type, budget(device, hp.perf.memory_budget_gib, held_gib=held)
                    if device.type == "cuda" else None, module.weight_dtype() != torch.float32)
    return resolve_perf(hp.perf, hp.lora, shape, target, weights, rank_zero_info, hp.base_dtype, storage,
                        pivotal=hp.pivotal is not None)


def apply_perf(perf: PerfSettings, m, encoders: tuple, dtype: torch.dtype, lora_dropout: float) -> None:
    """Apply the planned switches to the models of ``m`` (after the adapters exist, so compiled blocks include them).

    Args:
        perf: the resolved settings (:func:`plan_perf`).
        m: the module (or :class:`Model`): its unet and text encoders.
        encoders: :func:`adapted_encoders` (checkpointed and compiled with the UNet).
        dtype: the frozen base's dtype: fp32 runs keep the fp32 norms and inputs.
        lora_dropout: ``lora.dropout``: only dropout draws random numbers inside the checkpointed blocks.
    """
    plain_attention.use_plain_attention(m.unet)  # the same bits as diffusers' processor, a pass fewer each way
    if perf.fused_norms:  # before checkpointing wraps the resnets, and before half_norms, which leaves these alone
        fused_norms.fuse_norms(m.unet)
        fused_norms.fuse_norms(m.vae)  # the cache's encode (its norms over 128 channels x 1024²), the grids' decode
    if perf.gradient_checkpointing:
        perf_lib.set_checkpointing(m.unet, perf.checkpoint_every, preserve_rng_state=lora_dropout > 0)
        for model in encoders:
            model.gradient_checkpointing_enable()
    models = (m.unet, m.text_encoder, m.text_encoder_2)
    for model in models:
        if dtype != torch.float32:  # autocast runs the adapters' matmuls in half precision
            perf_lib.keep_lora_inputs_half(model)
        if perf.fused_lora:
            fuse_lora_layers(model, group_qkv=perf.group_qkv)
    if perf.fused_blocks and dtype != torch.float32:  # only autocast has the fp32 norms to remove
        block_ops.half_norms(m.unet)
        block_ops.fuse_geglu(m.unet)
    if perf.channels_last:
        perf_lib.to_channels_last(m.unet)
        if perf.fused_norms:  # the VAE too, its norms keeping the layout: the cache's encode at 1024² (128 channels)
            fused_norms.to_nhwc(m.vae)  # and the grids' decode run NHWC convolutions, without transposes
    if perf.compile_blocks:
        for model in (m.unet, *encoders):
            perf_lib.compile_blocks(model, perf.compile_regions, mode=perf.compile_mode)
