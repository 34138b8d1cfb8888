"""The LightningModule: frozen SDXL + trainable LoRA, wired to the loss, noise and prompt encoding modules."""
from __future__ import annotations

from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import lora as lora_lib
from . import perf
from .data.cache import build_cache, check_cache_mode
from .loss import DreamBoothLoss
from .noise import NoiseSchedule
from .sdxl import add_time_ids, encode_prompts, load_parts, scale_latents, tokenize

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DreamBoothLoRA(L.LightningModule):
    """DreamBooth with prior preservation (Ruiz et al. 2023) on SDXL, training LoRA adapters only.

    Args:
        base_model: SDXL pipeline folder or hub id.
        vae_model: optional separate VAE folder (e.g. the fp16-fix VAE).
        lora_rank: adapter rank.
        lora_alpha: adapter alpha (None: equal to the rank, scale 1).
        lora_dropout: dropout on the adapter input.
        lora_target_modules: UNet module-name suffixes to adapt (default: attention projections).
        lora_init: peft ``init_lora_weights``: ``gaussian`` (diffusers' script), ``true`` (peft's Kaiming
            uniform), any other peft init by name; false starts B non-zero (tests assert the adapter's effect).
        train_text_encoder: also train LoRA on both text encoders (q/k/v/out projections).
        text_encoder_lr: learning rate of the text-encoder adapters (None: ``learning_rate``; 5e-6 is diffusers'
            ``--text_encoder_lr``).
        prior_loss_weight: weight of the class-prior term.
        snr_gamma: min-SNR-gamma loss weighting (None: off; 5.0 is the paper's value).
        noise_offset: offset-noise strength (0: off).
        learning_rate: AdamW learning rate of the UNet adapters.
        optimizer: ``adamw`` or ``adamw8bit`` (bitsandbytes; needs a CUDA GPU, else AdamW with a warning).
        weight_decay: AdamW weight decay of the UNet adapters.
        text_encoder_weight_decay: AdamW weight decay of the text-encoder adapters (diffusers'
            ``--adam_weight_decay_text_encoder``).
        lr_scheduler: diffusers schedule name (constant, constant_with_warmup, linear, cosine, ...).
        lr_warmup_steps: linear warm-up steps.
        gradient_checkpointing: recompute UNet activations in backward (less memory, ~30% slower).
        vae_dtype: dtype the VAE encodes in; float16 is refused because the SDXL VAE overflows in it.
        seed: seed of per-step noise and timesteps (linked from ``seed_everything``).
        random_base: build a random-weight base of this preset at ``base_model`` if that folder does not exist
            (smoke runs, tests and benchmarks on machines without the real weights).
        cache: pre-encode inputs before the first step and free their encoders from the GPU: ``latents`` (VAE
            latents of every image, plain and mirrored; frees the VAE) or ``all`` (also the prompts' text
            embeddings; frees both text encoders; refused with ``train_text_encoder``). See data/cache.py.
        checkpoint_every: with ``gradient_checkpointing``, 1 recomputes every block (diffusers' own), k > 1 only
            every k-th transformer/resnet block (between the two in memory and speed).
        compile_blocks: ``torch.compile`` each repeated block (regional compilation; see perf.py).
        compile_regions: class names of the blocks ``compile_blocks`` compiles.
        compile_mode: ``torch.compile`` mode (None: default; ``reduce-overhead`` adds CUDA graphs).
        channels_last: NHWC memory format for the UNet's convolutions.
        attention: scaled-dot-product attention kernel (``auto`` lets PyTorch choose).
    """

    def __init__(self, base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
                 vae_model: Optional[str] = None, lora_rank: int = 4, lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, lora_target_modules: list[str] = list(lora_lib.UNET_TARGETS),
                 lora_init: Union[bool, str] = "gaussian", train_text_encoder: bool = False,
                 text_encoder_lr: Optional[float] = 5e-6, text_encoder_weight_decay: float = 1e-3,
                 prior_loss_weight: float = 1.0,
                 snr_gamma: Optional[float] = None, noise_offset: float = 0.0, learning_rate: float = 1e-4,
                 optimizer: Literal["adamw", "adamw8bit"] = "adamw", weight_decay: float = 1e-4,
                 lr_scheduler: str = "constant", lr_warmup_steps: int = 0, gradient_checkpointing: bool = False,
                 vae_dtype: Literal["float32", "bfloat16"] = "float32", seed: int = 0,
                 random_base: Optional[Literal["tiny", "sdxl"]] = None,
                 cache: Literal["off", "latents", "all"] = "off", checkpoint_every: int = 1,
                 compile_blocks: bool = False, compile_regions: list[str] = list(perf.BLOCKS),
                 compile_mode: Optional[str] = None, channels_last: bool = False,
                 attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"):
        super().__init__()
        self.save_hyperparameters()
        if lora_rank <= 0:
            raise ValueError(f"model.lora_rank must be > 0, got {lora_rank}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {lora_dropout}")
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate must be > 0, got {learning_rate}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"model.snr_gamma must be > 0 or null, got {snr_gamma}")
        self.loss_fn = DreamBoothLoss(prior_loss_weight)  # validates the weight before any model loads
        check_cache_mode(cache, train_text_encoder)
        if checkpoint_every < 1:
            raise ValueError(f"model.checkpoint_every must be >= 1, got {checkpoint_every} (turn checkpointing "
                             "off with model.gradient_checkpointing: false)")
        self.unet = None
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.strict_loading = False  # checkpoints hold only the trainable weights (see on_save_checkpoint)
        self._micro_batch = 0  # index within the accumulated step (on_train_batch_start)

    # ---- model set-up --------------------------------------------------------------------------------------
    def weight_dtype(self) -> torch.dtype:
        """Dtype of the frozen base: half under mixed precision (the T4 recipe), fp32 otherwise."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return torch.float16 if precision.startswith("16") else (
            torch.bfloat16 if precision.startswith("bf16") else torch.float32)

    def prepare_data(self) -> None:
        """Build the random base once per machine (local rank 0) before any process loads it."""
        if self.hparams.random_base:
            from pathlib import Path

            from .bases import make_base

            if not (Path(self.hparams.base_model) / "model_index.json").exists():
                make_base(self.hparams.random_base, self.hparams.base_model)

    def configure_model(self) -> None:
        """Load the base and inject adapters; Lightning calls this after the data is validated."""
        if self.unet is not None:
            return
        hp = self.hparams
        parts = load_parts(hp.base_model, hp.vae_model)
        self.tokenizers = (parts.tokenizer, parts.tokenizer_2)
        self.scheduler_config = parts.scheduler_config
        self.noise = NoiseSchedule(parts.scheduler_config)
        dtype = self.weight_dtype()
        self.unet = parts.unet.to(dtype)
        self.vae = parts.vae.to(_DTYPES[hp.vae_dtype])
        self.text_encoder = parts.text_encoder.to(dtype)
        self.text_encoder_2 = parts.text_encoder_2.to(dtype)
        cfg = lora_lib.lora_config(hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules,
                                   hp.lora_init)
        lora_lib.add_lora(self.unet, cfg)
        if hp.train_text_encoder:
            te_cfg = lora_lib.lora_config(hp.lora_rank, hp.lora_alpha, hp.lora_dropout, lora_lib.TEXT_TARGETS,
                                          hp.lora_init)
            lora_lib.add_lora(self.text_encoder, te_cfg)
            lora_lib.add_lora(self.text_encoder_2, te_cfg)
        if hp.gradient_checkpointing:
            perf.set_checkpointing(self.unet, hp.checkpoint_every)
            if hp.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
                self.text_encoder_2.gradient_checkpointing_enable()
        self.configure_speed()

    def configure_speed(self) -> None:
        """Apply the perf switches (after the adapters exist, so compiled blocks include them)."""
        hp = self.hparams
        if self.weight_dtype() != torch.float32:  # autocast runs the adapters' matmuls in half precision
            for m in (self.unet, self.text_encoder, self.text_encoder_2):
                perf.keep_lora_inputs_half(m)
        if hp.channels_last:
            perf.to_channels_last(self.unet)
        if hp.compile_blocks:
            for m in (self.unet, self.text_encoder, self.text_encoder_2) if hp.train_text_encoder else (self.unet,):
                perf.compile_blocks(m, hp.compile_regions, mode=hp.compile_mode)

    def on_fit_start(self) -> None:
        """With ``cache``: encode the data module's images (and prompts) now, then free those encoders."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.cache == "off" or dm is None or getattr(dm, "cache", None) is not None:
            return
        dm.cache = build_cache(self, dm.instance, dm.prior, dm.hparams.resolution, self.hparams.cache)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Named parameters that train (the adapters)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ---- encoders --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents, scaled (``sdxl.scale_latents``: with the VAE's latents_mean/std when it has them); encoded
        outside autocast in ``vae_dtype`` so the SDXL VAE cannot overflow."""
        with torch.autocast(self.device.type, enabled=False):
            dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            return scale_latents(dist.sample(generator).float(), self.vae.config)

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and pooled embeddings; cached per prompt while the text encoders are frozen."""
        encoders = (self.text_encoder, self.text_encoder_2)
        if self.hparams.train_text_encoder:
            return encode_prompts(encoders, [tokenize(t, prompts) for t in self.tokenizers])
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                emb, pooled = encode_prompts(encoders, [tokenize(t, missing) for t in self.tokenizers])
            for i, p in enumerate(missing):
                self._prompt_cache[p] = (emb[i].detach(), pooled[i].detach())
        return (torch.stack([self._prompt_cache[p][0] for p in prompts]),
                torch.stack([self._prompt_cache[p][1] for p in prompts]))

    # ---- training --------------------------------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """RNG of this micro-batch: a function of (seed, step, micro-batch, rank), so a resumed run draws the same
        noise, and the micro-batches of one accumulated step draw different noise."""
        gen = torch.Generator(self.device)
        step_seed = (self.hparams.seed * 1_000_003 + self.global_step) * 4099 + self.global_rank
        gen.manual_seed((step_seed + self._micro_batch * 0x9E3779B97F4A7C15) % 2**63)
        return gen

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # global_step repeats over the accumulate_grad_batches micro-batches of a step; this tells them apart
        self._micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        if self.hparams.lora_dropout > 0:  # dropout draws from the global RNG: make it a function of the step too
            torch.manual_seed((self.hparams.seed + 7919 * self.global_step + 104729 * self.global_rank
                               + 15485863 * self._micro_batch) % 2**63)

    def forward_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (see :class:`DreamBoothLoss`)."""
        gen = self.step_generator()
        if "latent_mean" in batch:  # cached latent distribution (data/cache.py): sample it, as the VAE would
            eps = torch.randn(batch["latent_mean"].shape, generator=gen, device=self.device)
            latents = scale_latents(batch["latent_mean"] + batch["latent_std"] * eps, self.vae.config)
        else:
            latents = self.encode_images(batch["pixel_values"], gen)
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        if self.hparams.noise_offset:  # offset noise (Guttenberg 2023): per-channel constant shift
            noise = noise + self.hparams.noise_offset * torch.randn(
                (*latents.shape[:2], 1, 1), generator=gen, device=self.device)
        t = self.noise.sample_timesteps(latents.shape[0], gen)
        noisy = self.noise.add_noise(latents, noise, t)
        if "prompt_embeds" in batch:
            prompt_embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        else:
            prompt_embeds, pooled = self.encode_text(batch["prompt"])
        size = torch.tensor([s * 8 for s in latents.shape[-2:]], device=self.device).expand(latents.shape[0], 2)
        time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"], size).to(self.device)
        if self.hparams.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with perf.attention_context(self.hparams.attention):
            pred = self.unet(noisy, t, encoder_hidden_states=prompt_embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        weights = self.noise.min_snr_weights(t, self.hparams.snr_gamma) if self.hparams.snr_gamma else None
        return self.loss_fn(pred, self.noise.target(latents, noise, t), batch["is_prior"], weights)

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        terms = self.forward_loss(batch)
        n = len(batch["prompt"])
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=n)
        self.log("train/loss_instance", terms["loss_instance"], batch_size=n)
        self.log("train/loss_prior", terms["loss_prior"], batch_size=n)
        # every term reaches callbacks (FaultTolerance names the one that went non-finite, without a host sync)
        return {"loss": terms["loss"], **{k: v.detach() for k, v in terms.items() if k != "loss"}}

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        hp = self.hparams
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        groups = [{"params": unet_params, "lr": hp.learning_rate, "weight_decay": hp.weight_decay}]
        if hp.train_text_encoder:
            te = [p for m in (self.text_encoder, self.text_encoder_2) for p in m.parameters() if p.requires_grad]
            groups.append({"params": te, "lr": hp.text_encoder_lr or hp.learning_rate,
                           "weight_decay": hp.text_encoder_weight_decay})
        if hp.optimizer == "adamw8bit" and self.device.type != "cuda":
            rank_zero_warn("model.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); using torch AdamW on "
                           f"{self.device.type}.")
        if hp.optimizer == "adamw8bit" and self.device.type == "cuda":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, weight_decay=hp.weight_decay, fused=self.device.type == "cuda")
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        sched = get_scheduler(hp.lr_scheduler, opt, num_warmup_steps=hp.lr_warmup_steps, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the adapters: a checkpoint is megabytes, and the frozen base is reloaded from its folder."""
        trainable = self.trainable_parameters()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected, got = set(self.trainable_parameters()), set(checkpoint.get("state_dict", {}))
        if expected != got:
            extra, missing = sorted(got - expected), sorted(expected - got)
            raise ValueError("checkpoint does not match this model's adapters: "
                             + (f"unexpected key {extra[0]!r} " if extra else "")
                             + (f"missing key {missing[0]!r} " if missing else "")
                             + f"({len(extra)} unexpected, {len(missing)} missing). Resume with the config "
                             "the checkpoint was trained with (its run's config.yaml).")

    def export_lora(self, path: str) -> str:
        """Write the adapters as a diffusers-format ``.safetensors`` that SDXL pipelines load."""
        te = self.hparams.train_text_encoder
        return str(lora_lib.save_diffusers_lora(path, self.unet, self.text_encoder if te else None,
                                                self.text_encoder_2 if te else None))
