"""What ``model.base_dtype`` costs in quality: the UNet's output on fixed inputs and the adapter update of 20
training steps from the same start, each storage against the unquantized base in the same compute dtype.

Inputs are synthetic latents and text embeddings (seeded), so no VAE or text encoder loads: the measure isolates
the UNet's storage. The step is the DreamBooth noise-prediction loss (Ruiz et al. 2023, eq. 1, one instance + one
prior latent) with the recipe's adapters (rank 4, gaussian init, attention projections) and optimizer (AdamW,
lr 1e-4, decay 1e-4). Runs on the tiny base in the CPU tests and on the full-size base in ``benchmarks/gpu.sh quant``.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _inputs(unet, scheduler_config: dict, resolution: int, device: torch.device) -> tuple:
    """(noisy latents, noise, timesteps, prompt embeddings, pooled embeddings, time ids) for two images, seeded."""
    from ..noise import NoiseSchedule

    gen = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents, noise = (torch.randn(2, 4, side, side, generator=gen) for _ in range(2))
    t = torch.tensor([300, 700])
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    tensors = (NoiseSchedule(scheduler_config).add_noise(latents, noise, t), noise, t,
               torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen),
               torch.randn(2, pooled_dim, generator=gen),
               torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=torch.float32))
    return tuple(x.to(device) for x in tensors)


def _unet(base: str, base_dtype: str, dtype: torch.dtype, device: torch.device):
    """The base's UNet in ``dtype`` with the recipe's LoRA (seeded) and its linears stored as ``base_dtype``."""
    from diffusers import UNet2DConditionModel

    from .. import perf, quant
    from ..adapter import kinds
    from ..sdxl import resolve_base

    unet = UNet2DConditionModel.from_pretrained(resolve_base(base), subfolder="unet", dtype=dtype)
    unet.requires_grad_(False)
    torch.manual_seed(0)
    kinds.add_adapter(unet, "lora", kinds.peft_config("lora", 4, 4, init="gaussian"))
    quant.quantize_base(unet, base_dtype, dtype, device)
    if dtype != torch.float32:
        perf.keep_lora_inputs_half(unet)  # as the module runs it under mixed precision
    return unet.to(device)


def measure(base: str, base_dtype: str, dtype: torch.dtype, device: torch.device, resolution: int,
            steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output on the fixed inputs, adapter update after ``steps`` steps) of one storage."""
    from diffusers import DDPMScheduler

    from ..sdxl import resolve_base

    unet = _unet(base, base_dtype, dtype, device)
    config = dict(DDPMScheduler.load_config(resolve_base(base), subfolder="scheduler"))
    noisy, noise, t, emb, pooled, ids = _inputs(unet, config, resolution, device)
    mixed = dtype != torch.float32

    def call():
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            return unet(noisy, t, encoder_hidden_states=emb,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()

    with torch.no_grad():
        out = call()
    params = [p for p in unet.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    scale = 1024.0 if dtype == torch.float16 else 1.0  # a fixed loss scale: fp16 gradients must not underflow
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (F.mse_loss(call(), noise) * scale).backward()
        for p in params:
            p.grad.div_(scale)
        opt.step()
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)]).cpu()
    return out.cpu(), update


def quant_quality(base: str, base_dtypes: Sequence[str] = ("float8", "nf4"), dtype: str = "float16",
                  device: Optional[str] = None, resolution: int = 1024, steps: int = 20,
                  out: Optional[str] = None) -> dict:
    """Relative error of the UNet's output and cosine of the ``steps``-step adapter update, per storage.

    Args:
        base: SDXL pipeline folder.
        base_dtypes: storages to compare against the unquantized base.
        dtype: compute dtype (``float16``: the recipe's mixed precision; ``float32`` on a CPU).
        device: cuda or cpu (None: CUDA when available).
        resolution: image side; latents are ``resolution / 8``.
        steps: optimizer steps of the update.
        out: append the result as one JSON line to this file.
    """
    from ..sdxl import DTYPES

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    half = DTYPES[dtype]
    ref_out, ref_update = measure(base, "float16", half, device, resolution, steps)
    result = {"base": base, "dtype": dtype, "resolution": resolution, "steps": steps, "device": str(device)}
    for name in base_dtypes:
        got_out, got_update = measure(base, name, half, device, resolution, steps)
        result[name] = {"output_rel_error": float((got_out - ref_out).norm() / ref_out.norm()),
                        "update_cosine": float(F.cosine_similarity(got_update, ref_update, dim=0))}
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result
