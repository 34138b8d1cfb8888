"""The smoke run end to end: configs/smoke.yaml on a fresh base, its outputs, and the LoRA in a diffusers pipeline."""
from pathlib import Path

import pytest
import torch

from dreambooth_pl.cli import DreamBoothCLI
from conftest import REPO, fit_args


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    """configs/smoke.yaml as shipped, with its outputs (base, class images, logs) moved under a temp folder."""
    import contextlib
    import io
    import warnings

    root = tmp_path_factory.mktemp("smoke")
    with warnings.catch_warnings(record=True) as seen, contextlib.redirect_stdout(io.StringIO()) as out:
        # what `python -m dreambooth_pl fit` shows: Python's default filters (deprecations hidden outside __main__)
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # in-process runs only
        cli = DreamBoothCLI(args=["fit", "--config", str(REPO / "configs" / "smoke.yaml"), "--trainer.max_steps",
                                  "3", "--model.base_model", str(root / "tiny-sdxl"), "--data.priors.dir",
                                  str(root / "class"), "--trainer.logger.init_args.save_dir", str(root),
                                  "--trainer.enable_progress_bar", "false"])
    return cli, root / "lightning_logs" / "version_0", seen, out.getvalue()


def test_smoke_console_has_only_our_warnings_and_ends_with_the_summary(smoke):
    _, run, seen, text = smoke
    foreign = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen if "dreambooth_pl" not in w.filename]
    assert not foreign, "\n".join(foreign)
    assert text.rstrip().splitlines()[-1].startswith("  sample:      python -m dreambooth_pl sample")
    assert f"LoRA:        {run}/pytorch_lora_weights.safetensors" in text and "fit finished: step 3/3" in text


def test_smoke_run_writes_logs_config_checkpoint_and_lora(smoke):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, run, *_ = smoke
    assert cli.trainer.global_step == 3
    assert (run / "config.yaml").exists() and len(list((Path(cli.datamodule.priors.dir)).glob("*.png"))) == 4
    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_instance", "train/loss_prior"} <= tags
    assert any(t.startswith("lr-") for t in tags), tags
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.stat().st_size < 50 * 2**20
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 3 and state["optimizer_states"] and state["lr_schedulers"]
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    assert (run / "pytorch_lora_weights.safetensors").exists()


def test_smoke_lora_loads_into_a_diffusers_pipeline_and_changes_its_output(smoke):
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    cli, run, *_ = smoke
    pipe = StableDiffusionXLPipeline.from_pretrained(cli.model.hparams.base_model)
    kw = dict(prompt="a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(run / "pytorch_lora_weights.safetensors"))
    trained, loaded = get_peft_model_state_dict(cli.model.unet), get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(after - before).max() > 1e-4


def test_no_prior_run_trains_on_instances_alone(subject_dirs, tiny_base, tmp_path):
    with pytest.warns(UserWarning, match="adamw8bit needs a CUDA GPU"):
        cli = DreamBoothCLI(args=fit_args(tiny_base, subject_dirs[0], None, str(tmp_path), steps=2,
                                          **{"model.optim.name": "adamw8bit"}))
    assert cli.trainer.global_step == 2 and cli.datamodule.prior is None
    assert isinstance(cli.trainer.optimizers[0], torch.optim.AdamW)
    logged = cli.trainer.logged_metrics
    assert logged["train/loss_prior"].item() == 0.0
    assert logged["train/loss"].item() == logged["train/loss_instance"].item() > 0


@pytest.mark.gpu
def test_t4_recipe_on_gpu_16_mixed_adamw8bit_checkpointing(subject_dirs, tiny_base, tmp_path):
    """The SDXL config's training switches on a CUDA GPU: fp16 base, the recipe's ``vae_dtype: auto`` (bf16 where the
    GPU has it natively, fp32 on a T4), fp32 adapters, 8-bit AdamW; the cache and the loss finite with it."""
    import bitsandbytes as bnb

    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), steps=2, **{
        "trainer.accelerator": "gpu", "trainer.precision": "16-mixed", "model.optim.name": "adamw8bit",
        "model.perf.gradient_checkpointing": "true", "data.resolution": "64", "model.vae_dtype": "auto",
        "model.perf.cache": "latents"})
    cli = DreamBoothCLI(args=args)
    m = cli.model
    assert isinstance(cli.trainer.optimizers[0], bnb.optim.AdamW8bit)
    vae = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    assert m.unet.dtype == torch.float16 and m.vae.dtype == vae and cli.datamodule.cache is not None
    assert {p.dtype for p in m.trainable_parameters().values()} == {torch.float32}
    logged = cli.trainer.logged_metrics
    assert all(torch.isfinite(logged[k]) for k in ("train/loss", "train/loss_instance", "train/loss_prior"))
