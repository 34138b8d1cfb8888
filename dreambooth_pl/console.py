"""A quiet console: exactly the listed third-party notices that every run prints are hidden; every warning of our
own, and any other, still shows. ``DREAMBOOTH_PL_SHOW_ALL_WARNINGS=1`` shows everything."""
from __future__ import annotations

import logging
import os
import re
import warnings

SHOW_ALL_ENV = "DREAMBOOTH_PL_SHOW_ALL_WARNINGS"
# (what, warning-message regex) -- Python warnings raised by Lightning
WARNINGS = (
    ("pytree deprecation", r".*`isinstance\(treespec, LeafSpec\)` is deprecated"),
    ("eval-mode modules", r"Found \d+ module\(s\) in eval mode at the start of training"),
    ("num_workers hint", r"The '\w+' does not have many workers which may be a bottleneck"),
    # raised inside autograd's engine (the console then shows `return Variable._execution_engine.run_backward(`):
    # cuDNN attention re-lays out a gradient once, and a graph captured on a side stream accumulates the frozen
    # base's gradient-free adapters there; both are measured costs of the step, not news for the user
    ("cuDNN SDPA stride copy", r"cuDNN SDPA backward got grad_output\.strides\(\) != output\.strides\(\)"),
    ("AccumulateGrad stream", r"The AccumulateGrad node's stream does not match the stream of the node"),
    # the data module's val_dataloader is an empty list unless data.photos.held_out holds photos out
    ("no held-out photos", r"Total length of `list` across ranks is zero"),
)
# (emitting logger, log-message regex) -- log records; a filter on the emitting logger holds whatever the handlers
RECORDS = (
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),  # the litlogger tip
    ("diffusers.models.modeling_utils", r"There are modules in \w+ that should be kept in float32: \[\]"),
    ("lightning.pytorch.callbacks.model_summary", r"$^"),  # only its zero Total Flops line
    ("lightning.pytorch.callbacks.rich_model_summary", r"$^"),
    # the CLI installs its own plain summary (callbacks/progress.py), which Lightning reports as a second notice
    ("lightning.pytorch.utilities.rank_zero", r"Trainer already configured with model summary callbacks"),
    # the end-of-fit summary (callbacks/progress.py) says the same with the step count
    ("lightning.pytorch.utilities.rank_zero", r"`Trainer.fit` stopped: `max_steps=\d+` reached"),
    # the CLI sets the float32 matmul precision itself (cli.matmul_precision); the tip only repeats the choice
    ("lightning.fabric.utilities.rank_zero", r"You are using a CUDA device .* that has Tensor Cores"),
    # the one-line parameter summary (callbacks/progress.py) replaces the table this warns about
    ("lightning.pytorch.utilities.rank_zero", r"Precision \S+ is not supported by the model summary"),
    # bitsandbytes on an AVX512-BF16 CPU, at import: an optional hub kernel for 4-bit CPU inference we never use
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # sample/evaluate with a UNet-only LoRA: diffusers looks for text-encoder keys and says it found none
    ("diffusers.loaders.lora_base", r"No LoRA keys associated to CLIPTextModel(WithProjection)? found"),
    ("diffusers.loaders.peft", r"No LoRA keys associated to CLIPTextModel(WithProjection)? found"),
)
_ZERO_FLOPS = re.compile(r"\n[ \t]*0[ \t]+Total Flops[ \t]*(?=\n|$)")


class _Drop(logging.Filter):
    """Drops the listed records, and the always-zero ``Total Flops`` line of Lightning's model summary."""

    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if any(p.match(msg) for p in self.patterns):
            return False
        if "Total Flops" in msg:
            record.msg = _ZERO_FLOPS.sub("", msg)
        return True


def quiet_third_party(models: bool = True) -> None:
    """Install the filters (idempotent); no-op when :data:`SHOW_ALL_ENV` is set.

    Args:
        models: this process loads models: also turn off diffusers' and transformers' per-file progress bars,
            which imports both (about 2.5 s with torch). The Ray drivers of ``ablate`` and ``fit-many`` pass False.
    """
    if os.environ.get(SHOW_ALL_ENV, "") not in ("", "0"):
        return
    for _, pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if models:
        # diffusers' and transformers' per-file "Loading weights" / "Writing model shards" bars on every model load
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    by_logger: dict[str, list[re.Pattern]] = {}
    for name, pattern in RECORDS:
        by_logger.setdefault(name, []).append(re.compile(pattern))
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(patterns))
