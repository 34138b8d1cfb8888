"""GPU acceptance suite: the shipped recipe and every GPU-facing verb on a full-size random SDXL base, in one call.

Run through the device tool: ``bash benchmarks/gpu.sh tests`` (``pytest -m gpu``). The base is built once per
machine under ``data/_cache/sdxl-random``; speed and memory do not depend on weight values, and every assertion
here is about numbers (finite losses and scores, outputs matching within a tolerance), not that a step ran.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sdxl_lora_prior.yaml"
SIZE = 512  # callbacks and verbs sample at 512 px (64x64 latents) to keep the suite inside one call


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(full-size random base, instance dir, class dir, scratch dir)."""
    from dreambooth_pl.tools.benchmark import build_base, prepare_inputs

    base = build_base(str(REPO / "data" / "_cache" / "sdxl-random"), "sdxl")
    work = tmp_path_factory.mktemp("gpu")
    return (base, *prepare_inputs(work / "inputs"), work)


def recipe_args(sdxl, root: Path, steps: int, *extra: str) -> list[str]:
    base, instance_dir, class_dir, _ = sdxl
    return ["fit", "--config", str(RECIPE), "--model.base_model", base, "--data.photos.dir", instance_dir,
            "--data.priors.dir", class_dir, "--data.priors.num_images", "4", f"--trainer.max_steps={steps}",
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar=false",
            "--checkpoint.every_n_train_steps=5", *extra]


CALLBACKS = ["--trainer.callbacks+=dreambooth_pl.callbacks.sample_grid.SampleGrid",
             "--trainer.callbacks.every_n_steps=5", "--trainer.callbacks.sampler.steps=4",
             f"--trainer.callbacks.resolution={SIZE}",
             "--trainer.callbacks+=dreambooth_pl.callbacks.subject_metrics.SubjectMetrics",
             "--trainer.callbacks.every_n_steps=5", "--trainer.callbacks.clip_weights=null",
             "--trainer.callbacks.dino_weights=null"]


def finite_losses(trainer) -> None:
    for k in ("train/loss", "train/loss_instance", "train/loss_prior"):
        assert torch.isfinite(trainer.logged_metrics[k]), k


@pytest.fixture(scope="module")
def recipe_run(sdxl):
    """The shipped recipe (16-mixed, cached inputs, CUDA graph, 8-bit Adam) with both callbacks, 10 steps."""
    from dreambooth_pl.cli import DreamBoothCLI

    root = sdxl[3] / "recipe"
    return DreamBoothCLI(args=recipe_args(sdxl, root, 10, *CALLBACKS)), root


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_recipe_trains_and_scores_under_mixed_precision(sdxl, recipe_run, precision):
    from dreambooth_pl.callbacks.sample_grid import SampleGrid
    from dreambooth_pl.callbacks.subject_metrics import SubjectMetrics
    from dreambooth_pl.cli import DreamBoothCLI

    if precision == "16-mixed":
        cli, root = recipe_run
    else:
        root = sdxl[3] / "bf16"
        cli = DreamBoothCLI(args=recipe_args(sdxl, root, 10, "--trainer.precision=bf16-mixed", *CALLBACKS))
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 10 and model.unet.dtype == (torch.float16 if precision == "16-mixed"
                                                               else torch.bfloat16)
    assert model.graph_stats == {"replays": 10, "fallbacks": 0}  # the step really was replayed
    finite_losses(trainer)
    scores = next(cb for cb in trainer.callbacks if isinstance(cb, SubjectMetrics)).last_scores
    assert set(scores) == {"val/clip_i", "val/clip_t", "val/dino"} and all(np.isfinite(list(scores.values())))
    grid = next(cb for cb in trainer.callbacks if isinstance(cb, SampleGrid))
    model.cuda()  # Lightning hands the module back on the CPU when fit ends
    image = np.asarray(grid.draw(trainer, model)[0], dtype=float)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 1  # decoded, not NaN-black or flat
    assert sorted(p.name for p in root.glob("lightning_logs/*/samples/*.png"))[0] == "samples_base_step000000.png"


def test_resume_from_last_continues_the_run(sdxl, recipe_run):
    from dreambooth_pl.cli import DreamBoothCLI

    cli, root = recipe_run
    last = next(root.glob("lightning_logs/*/checkpoints/last.ckpt"))
    before = {k: v.detach().clone() for k, v in cli.model.trainable_parameters().items()}
    resumed = DreamBoothCLI(args=recipe_args(sdxl, sdxl[3] / "resumed", 12, "--ckpt_path", str(last)))
    assert resumed.trainer.global_step == 12
    finite_losses(resumed.trainer)
    after = resumed.model.trainable_parameters()
    assert any(not torch.equal(before[k].cpu(), after[k].detach().cpu()) for k in before)  # trained on from step 10


@pytest.fixture(scope="module")
def exported(sdxl, recipe_run):
    """The recipe's adapters with non-zero, seeded B (a visible effect), exported in both layouts."""
    from dreambooth_pl.tools.export import export

    cli, _ = recipe_run
    cli.model.cuda()  # Lightning hands the module back on the CPU when fit ends
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in cli.model.trainable_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    work = sdxl[3]
    diffusers_file = cli.model.export_lora(str(work / "export" / "pytorch_lora_weights.safetensors"))
    kohya_file = export(diffusers_file, str(work / "export" / "kohya.safetensors"), format="kohya")
    return cli.model, {"diffusers": diffusers_file, "kohya": kohya_file}


def unet_out(unet, dtype=torch.float16):
    """One fixed UNet call at 64x64 latents under fp16 autocast (the trainer's own numerics)."""
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 4, 64, 64, device="cuda", generator=gen)
    emb = torch.randn(1, 77, 2048, device="cuda", generator=gen)
    pooled = torch.randn(1, 1280, device="cuda", generator=gen)
    ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], device="cuda", dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        return unet(x, torch.tensor([500], device="cuda"), encoder_hidden_states=emb,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.float()


@pytest.fixture(scope="module")
def plain(sdxl):
    """The base UNet's output without any adapter."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sdxl[0], subfolder="unet", dtype=torch.float16).to("cuda")
    return unet_out(unet)


def test_exports_load_in_diffusers_and_match_the_trained_adapters(sdxl, exported, plain):
    from diffusers import StableDiffusionXLPipeline

    model, files = exported
    ours = unet_out(model.unet)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl[0], dtype=torch.float16).to("cuda")
    effect = (ours - plain).norm()
    for layout, path in files.items():
        pipe.load_lora_weights(path, adapter_name=layout)
        loaded = unet_out(pipe.unet)
        pipe.unload_lora_weights()
        err = (loaded - ours).norm()
        assert torch.isfinite(loaded).all() and effect > 0 and err <= 0.05 * effect, (layout, float(err),
                                                                                      float(effect))


@pytest.fixture(scope="module")
def sampled(sdxl, exported):
    from dreambooth_pl.tools.sample import sample

    from dreambooth_pl.sampling import SamplerSettings

    _, files = exported
    outs = {}
    for scheduler in ("euler", "dpmpp_2m"):
        outs[scheduler] = sample(base=sdxl[0], out=str(sdxl[3] / f"samples-{scheduler}"), prompt="a photo of sks dog",
                                 lora=files["diffusers"], sampler=SamplerSettings(scheduler, 4), height=SIZE,
                                 width=SIZE,
                                 images_per_prompt=2)
    return outs


def test_sample_with_two_schedulers(sampled):
    from PIL import Image

    images = {s: [np.asarray(Image.open(p), dtype=float) for p in sorted(Path(out).parent.glob("*.png"))
                  if p.name != "contact_sheet.png"] for s, out in sampled.items()}
    for s, imgs in images.items():
        assert len(imgs) == 2 and all(im.shape == (SIZE, SIZE, 3) and im.std() > 1 for im in imgs), s
    assert np.abs(images["euler"][0] - images["dpmpp_2m"][0]).mean() > 0.5  # the scheduler really changed


def test_generate_class_images(sdxl):
    from PIL import Image

    from dreambooth_pl.sampling import SamplerSettings
    from dreambooth_pl.tools.generate_class_images import generate_class_images

    out = sdxl[3] / "class-gen"
    generate_class_images(base=sdxl[0], prompt="a photo of dog", out=str(out), num=2, sampler=SamplerSettings(steps=4),
                          resolution=SIZE, progress=False)
    images = [np.asarray(Image.open(p), dtype=float) for p in sorted(out.glob("*.png"))]
    assert len(images) == 2 and all(im.shape == (SIZE, SIZE, 3) and im.std() > 1 for im in images)


def test_evaluate_scores_the_samples(sdxl, sampled):
    from dreambooth_pl.tools.evaluate import evaluate

    folders = [str(Path(m).parent) for m in sampled.values()]
    evaluate(folders, real=sdxl[1], out=str(sdxl[3] / "eval"), clip_weights=None, dino_weights=None)
    rows = json.loads((sdxl[3] / "eval" / "results.json").read_text())["rows"]
    for folder in folders:
        values = [v for v in rows[folder].values() if isinstance(v, float)]
        assert len(values) >= 3 and all(np.isfinite(values)), rows[folder]


def test_merge_fuse_equals_the_loaded_adapter(sdxl, exported, plain):
    from diffusers import UNet2DConditionModel

    from dreambooth_pl.tools.merge import merge

    model, files = exported
    fused = merge([f"{files['diffusers']}:1.0"], out=str(sdxl[3] / "fused"), method="fuse", base=sdxl[0])
    unet = UNet2DConditionModel.from_pretrained(fused, subfolder="unet", dtype=torch.float16).to("cuda")
    ours, got = unet_out(model.unet), unet_out(unet)
    effect = (ours - plain).norm()
    assert torch.isfinite(got).all() and effect > 0 and (got - ours).norm() <= 0.05 * effect


def test_text_encoder_lora_three_steps(sdxl):
    from dreambooth_pl.cli import DreamBoothCLI

    cli = DreamBoothCLI(args=recipe_args(sdxl, sdxl[3] / "te", 3, "--model.lora.train_text_encoder=true",
                                         "--model.perf.cache=latents", "--model.perf.cuda_graph=false",
                                         "--model.lora.init=false"))
    assert cli.trainer.global_step == 3
    finite_losses(cli.trainer)
    te = [p for p in cli.model.text_encoder.parameters() if p.requires_grad]
    assert te and all(torch.isfinite(p).all() for p in te)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (kind nvidia-h200-x2)")
def test_ddp_two_gpus_trains_and_exports_once(sdxl):
    import os
    import subprocess
    import sys

    import signal

    root = sdxl[3] / "ddp"
    args = recipe_args(sdxl, root, 4, "--trainer.devices=2", "--trainer.strategy=ddp")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONFAULTHANDLER": "1"}
    # straight into $OUT where the device tool brings it back, so a hang killed by an outer timeout still reports
    log = Path(os.environ["OUT"]) / "ddp-test.log" if os.environ.get("OUT") else root.parent / "ddp.log"
    with open(log, "w") as out:  # both ranks write here; a hang is killed with SIGABRT so each rank dumps its stacks
        proc = subprocess.Popen([sys.executable, "-m", "dreambooth_pl", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=240)  # a 4-step recipe on 2 GPUs takes about a minute
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)
            proc.wait(timeout=60)
            rc = "hung"
    text = log.read_text(errors="replace")
    assert rc == 0, f"DDP fit {rc}:\n{text[-6000:]}"
    from safetensors.torch import load_file

    lora = load_file(next(root.glob("lightning_logs/*/pytorch_lora_weights.safetensors")))
    assert lora and all(torch.isfinite(t).all() for t in lora.values())


def test_auto_memory_plan_fits_a_16gb_budget(sdxl):
    from dreambooth_pl.cli import DreamBoothCLI

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()  # what earlier tests of this process still hold
    # the shipped recipe plans its memory (memory_plan: auto); a 16 GB card's budget picks the T4 plan
    # the latents encoded, not read from an earlier test's store: the encode belongs in the bounded peak
    cli = DreamBoothCLI(args=recipe_args(sdxl, sdxl[3] / "auto", 3, "--model.perf.memory_budget_gib=15",
                                         "--data.latent_cache=null"))
    finite_losses(cli.trainer)
    p = cli.model.perf
    assert (p.cache, p.cuda_graph, p.gradient_checkpointing, p.checkpoint_every, p.fused_lora) == (
        "all", True, True, 1, False)
    assert (torch.cuda.max_memory_reserved() - before) / 2**30 <= 10.0


def test_the_recipes_console_prints_only_the_allowed_lines(sdxl, tmp_path):
    """What a user sees of `fit --config configs/sdxl_lora_prior.yaml` in a terminal (a process of its own: the
    console is the point), with class priors drawn first, aspect buckets and the bar on; then `sample` with its
    UNet-only LoRA prints no diffusers notice. Allowed lines: conftest.CONSOLE_ALLOWED."""
    import os
    import subprocess
    import sys

    from conftest import fit_console

    root = tmp_path / "console"
    lines = fit_console(recipe_args(sdxl, root, 5, "--data.priors.dir", str(tmp_path / "drawn"),
                                    "--data.priors.generate=true", "--data.crops.aspect_buckets=true",
                                    "--trainer.enable_progress_bar=true"), 400)
    assert sum("images adjusted on load" in ln for ln in lines) <= 1  # the saved config's bucket table re-reads them
    lora = next(root.glob("lightning_logs/*/pytorch_lora_weights.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_PL_SHOW_ALL_WARNINGS"}
    run = subprocess.run([sys.executable, "-m", "dreambooth_pl", "sample", "--base", sdxl[0], "--lora", str(lora),
                          "--prompt", "a photo of sks dog", "--sampler.steps", "2", "--height", str(SIZE),
                          "--width", str(SIZE),
                          "--out", str(tmp_path / "samples")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    assert "No LoRA keys" not in text and "kept in float32" not in text, text[-4000:]
