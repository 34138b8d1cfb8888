"""The LightningModule: frozen SDXL + trainable LoRA, wired to the loss, noise and prompt encoding modules."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import adapters
from . import lora as lora_lib
from . import perf
from .data.cache import Encoders, check_cache_mode
from .graphs import GraphedCall
from .loss import DreamBoothLoss, latent_weights
from .noise import NoiseSchedule
from .optimizers import OptimizerName, build_optimizer, step_size_estimates
from .sdxl import add_time_ids, encode_prompts, load_parts, scale_latents, tokenize

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DreamBoothLoRA(L.LightningModule):
    """DreamBooth with prior preservation (Ruiz et al. 2023) on SDXL, training LoRA adapters only.

    Args:
        base_model: SDXL pipeline folder or hub id.
        vae_model: optional separate VAE folder (e.g. the fp16-fix VAE).
        adapter: adapter type: ``lora``, ``dora``, ``lokr`` or ``loha`` (adapters.py; the ``lora_*`` keys set
            its rank, alpha, targets and init).
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
        learning_rate: learning rate of the UNet adapters (Prodigy: a multiplier of its estimate, 1.0).
        optimizer: ``adamw``, ``adamw8bit`` (bitsandbytes; needs a CUDA GPU, else AdamW with a warning) or
            ``prodigy`` (d-adaptation, prodigyopt; its step-size estimate is logged as ``train/prodigy_d_lr``).
        weight_decay: decoupled weight decay.
        ema_decay: keep an exponential moving average of the adapter weights with this decay (None: off; see
            ema.py); sample grids and metrics then use the average.
        ema_export: with ``ema_decay``, export the averaged weights (False: the raw ones).
        text_encoder_weight_decay: decoupled weight decay of the text-encoder adapters (diffusers'
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
        cuda_graph: replay the UNet's forward and backward from a CUDA graph (graphs.py): the step stops being
            bound by Python launching ~10k small adapter kernels. Needs a CUDA device, frozen text encoders, no
            adapter dropout and no ``compile_blocks``; on a CPU it is ignored with a warning.
        memory_plan: ``manual`` uses the switches above as given; ``auto`` picks caching, checkpointing and the
            CUDA graph on a CUDA device: the fastest measured plan whose estimate fits the budget
            (memory_plan.py), and fails naming every plan's need when none does.
        memory_budget_gib: GiB that ``auto`` may plan for (None: the GPU's free memory; 14.5 keeps a run inside
            a 16 GB T4 on a bigger card).
    """

    def __init__(self, base_model: str = "stabilityai/stable-diffusion-xl-base-1.0",
                 vae_model: Optional[str] = None, lora_rank: int = 4, lora_alpha: Optional[float] = None,
                 lora_dropout: float = 0.0, lora_target_modules: list[str] = list(lora_lib.UNET_TARGETS),
                 lora_init: Union[bool, str] = "gaussian", train_text_encoder: bool = False,
                 text_encoder_lr: Optional[float] = 5e-6, text_encoder_weight_decay: float = 1e-3,
                 prior_loss_weight: float = 1.0,
                 snr_gamma: Optional[float] = None, noise_offset: float = 0.0, learning_rate: float = 1e-4,
                 optimizer: OptimizerName = "adamw", weight_decay: float = 1e-4,
                 ema_decay: Optional[float] = None, ema_export: bool = True, adapter: adapters.AdapterType = "lora",
                 lr_scheduler: str = "constant", lr_warmup_steps: int = 0, gradient_checkpointing: bool = False,
                 vae_dtype: Literal["float32", "bfloat16"] = "float32", seed: int = 0,
                 random_base: Optional[Literal["tiny", "sdxl"]] = None,
                 cache: Literal["off", "latents", "all"] = "off", checkpoint_every: int = 1,
                 compile_blocks: bool = False, compile_regions: list[str] = list(perf.BLOCKS),
                 compile_mode: Optional[str] = None, channels_last: bool = False,
                 attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto",
                 cuda_graph: bool = False, memory_plan: Literal["manual", "auto"] = "manual",
                 memory_budget_gib: Optional[float] = None):
        super().__init__()
        self.save_hyperparameters()
        if lora_rank <= 0:
            raise ValueError(f"model.lora_rank must be > 0, got {lora_rank}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {lora_dropout}")
        adapters.check_settings(adapter, lora_dropout)
        if learning_rate <= 0:
            raise ValueError(f"model.learning_rate must be > 0, got {learning_rate}")
        if noise_offset < 0 or lr_warmup_steps < 0:
            key, value = ("noise_offset", noise_offset) if noise_offset < 0 else ("lr_warmup_steps", lr_warmup_steps)
            raise ValueError(f"model.{key} must be >= 0, got {value}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"model.snr_gamma must be > 0 or null, got {snr_gamma}")
        self.loss_fn = DreamBoothLoss(prior_loss_weight)  # validates the weight before any model loads
        check_cache_mode(cache, train_text_encoder)
        if checkpoint_every < 1:
            raise ValueError(f"model.checkpoint_every must be >= 1, got {checkpoint_every} (turn checkpointing "
                             "off with model.gradient_checkpointing: false)")
        if cuda_graph:
            clash = [k for k, on in (("model.train_text_encoder", train_text_encoder),
                                     ("model.lora_dropout", lora_dropout > 0), ("model.compile_blocks", compile_blocks))
                     if on]
            if clash:
                raise ValueError(f"model.cuda_graph replays a fixed UNet call, which {clash[0]} breaks (text "
                                 "embeddings that need gradients, random dropout masks, or compiled code in the "
                                 f"capture). Turn {clash[0]} off, or set model.cuda_graph: false.")
        if memory_budget_gib is not None and memory_budget_gib <= 0:
            raise ValueError(f"model.memory_budget_gib must be > 0 or null, got {memory_budget_gib}")
        self.unet = None
        self._graphed = None
        self.graph_stats: dict[str, int] = {}  # replays and eager fallbacks of the last fit's CUDA graph
        # the speed switches in force: the manual ones, or memory_plan=auto's choice (configure_model)
        self.speed = {"cache": cache, "cuda_graph": cuda_graph,
                      "checkpoint_every": checkpoint_every if gradient_checkpointing else 0}
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1) or null (off), got {ema_decay}")
        self.ema = None  # AdapterEMA, built with the adapters in configure_model
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
            from .bases import build_random_base

            build_random_base(self.hparams.random_base, self.hparams.base_model)  # refuses folders not its own

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
        cfg = adapters.adapter_config(hp.adapter, hp.lora_rank, hp.lora_alpha, hp.lora_dropout,
                                      hp.lora_target_modules, hp.lora_init)
        adapters.add_adapter(self.unet, hp.adapter, cfg)
        if hp.train_text_encoder:
            te_cfg = adapters.adapter_config(hp.adapter, hp.lora_rank, hp.lora_alpha, hp.lora_dropout,
                                             lora_lib.TEXT_TARGETS, hp.lora_init)
            adapters.add_adapter(self.text_encoder, hp.adapter, te_cfg)
            adapters.add_adapter(self.text_encoder_2, hp.adapter, te_cfg)
        if hp.memory_plan == "auto":
            self.plan_memory()
        if self.speed["checkpoint_every"]:  # only dropout draws random numbers inside the UNet's blocks
            perf.set_checkpointing(self.unet, self.speed["checkpoint_every"], preserve_rng_state=hp.lora_dropout > 0)
            if hp.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
                self.text_encoder_2.gradient_checkpointing_enable()
        if hp.ema_decay is not None:
            from .ema import AdapterEMA

            self.ema = AdapterEMA(self.trainable_parameters(), hp.ema_decay)
        self.configure_speed()
        perf.ddp_ignore_frozen(self)

    def plan_memory(self) -> None:
        """``memory_plan: auto``: cache every input the run allows, then the fastest plan that fits the GPU."""
        from .memory_plan import plan_speed

        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if device.type != "cuda":
            rank_zero_warn(f"model.memory_plan=auto plans GPU memory; on {device.type} the manual switches apply.")
            return
        dm = getattr(self.trainer, "datamodule", None)
        self.speed = plan_speed(self, device, dm.hparams if dm is not None else None)

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
        """With ``cache``: hand the encoders to the data module, which encodes its images (and prompts) now and
        frees those encoders; the UNet waits on the CPU meanwhile."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.speed["cache"] == "off" or dm is None:
            return
        dm.cache_inputs(Encoders(self.vae, (self.text_encoder, self.text_encoder_2), self.tokenizers,
                                 park=(self.unet,)), self.speed["cache"])

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Named parameters that train (the adapters)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def averaged_weights(self):
        """Context in which the adapters hold their EMA (``ema_decay``), or a no-op when EMA is off."""
        return self.ema.applied() if self.ema is not None else nullcontext()

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
        pred = self.unet_call()(noisy, t, prompt_embeds, pooled, time_ids)
        weights = self.noise.min_snr_weights(t, self.hparams.snr_gamma) if self.hparams.snr_gamma else None
        mask = latent_weights(batch["loss_mask"], latents.shape[-2:]) if "loss_mask" in batch else None
        return self.loss_fn(pred, self.noise.target(latents, noise, t), batch["is_prior"], weights, mask)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:  # once per real optimizer step, before any callback samples at this step
            self.ema.update()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for name, value in step_size_estimates(self.trainer.optimizers[0]).items():
            self.log(name, value, batch_size=len(batch["prompt"]))

    def _unet(self, noisy, t, prompt_embeds, pooled, time_ids) -> torch.Tensor:
        """The UNet's noise prediction from positional tensors (the form a CUDA graph captures)."""
        with perf.attention_context(self.hparams.attention):
            return self.unet(noisy, t, encoder_hidden_states=prompt_embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def unet_call(self):
        """The eager UNet call, or its CUDA-graph replay with ``cuda_graph`` on a CUDA device."""
        if not self.speed["cuda_graph"] or not torch.is_grad_enabled():
            return self._unet
        if self.device.type != "cuda":
            if self._graphed is None:
                rank_zero_warn(f"model.cuda_graph needs a CUDA device; running the UNet eagerly on {self.device.type}.")
                self._graphed = self._unet
            return self._graphed
        if self._graphed is None:
            dtype = self.weight_dtype()
            self._graphed = GraphedCall(self._unet, [p for p in self.unet.parameters() if p.requires_grad],
                                        None if dtype == torch.float32 else dtype)
        return self._graphed

    def teardown(self, stage: str) -> None:
        # Lightning moves the module to the CPU after fit: a kept graph would replay stale parameter addresses
        if isinstance(self._graphed, GraphedCall):
            self.graph_stats = {"replays": self._graphed.replays, "fallbacks": self._graphed.fallbacks}
        self._graphed = None

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
        opt = build_optimizer(hp.optimizer, groups, hp.weight_decay, self.device)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        sched = get_scheduler(hp.lr_scheduler, opt, num_warmup_steps=hp.lr_warmup_steps, num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the adapters: a checkpoint is megabytes, and the frozen base is reloaded from its folder."""
        trainable = self.trainable_parameters()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected, got = set(self.trainable_parameters()), set(checkpoint.get("state_dict", {}))
        if expected != got:
            extra, missing = sorted(got - expected), sorted(expected - got)
            raise ValueError("checkpoint does not match this model's adapters: "
                             + (f"unexpected key {extra[0]!r} " if extra else "")
                             + (f"missing key {missing[0]!r} " if missing else "")
                             + f"({len(extra)} unexpected, {len(missing)} missing). Resume with the config "
                             "the checkpoint was trained with (its run's config.yaml).")
        if self.ema is not None:
            if "ema" not in checkpoint:
                raise ValueError("model.ema_decay is set but the checkpoint holds no EMA weights (its run had EMA "
                                 "off): resume with model.ema_decay: null, or start a new run.")
            self.ema.load_state_dict(checkpoint["ema"])

    def export_lora(self, path: str, format: Literal["auto", "diffusers", "kohya"] = "auto") -> str:
        """Write the adapters as ``.safetensors``: diffusers layout (``auto`` for LoRA/DoRA; SDXL pipelines'
        ``load_lora_weights``) or kohya/LyCORIS (``auto`` for LoKr/LoHa; A1111, ComfyUI)."""
        te = self.hparams.train_text_encoder
        models = {"unet": self.unet, "text_encoder": self.text_encoder if te else None,
                  "text_encoder_2": self.text_encoder_2 if te else None}
        with self.averaged_weights() if self.hparams.ema_export else nullcontext():
            return str(adapters.save_adapter(path, self.hparams.adapter, models, format))
