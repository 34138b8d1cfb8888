"""Every verb reads every kind fit writes: fit (tiny base) -> sample -> evaluate-suite -> export --format kohya ->
sample from the kohya file, with the images of the fit's own file and of the in-memory model (an ablation cell of
another kind: test_ablate.py's failing-cell grid)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fit_args, write_images
from safetensors.torch import load_file

from dreambooth_pl.adapter.files import LORA_FILE, read_adapter
from dreambooth_pl.sampling import SamplerSettings

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "dog"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verbs") / "instance"
    write_images(folder, 2, seed=7)
    return str(folder)


@torch.no_grad()
def _latents(pipe) -> torch.Tensor:
    """Final latents of two seeded prompts (before the VAE, so a tolerance means something)."""
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(prompt=["a photo of sks dog", "sks dog in the snow"], num_inference_steps=2, guidance_scale=5.0,
                height=64, width=64, generator=gens, output_type="latent").images


@pytest.mark.parametrize("kind", ["lora", "dora", "lokr", "loha"])
def test_every_verb_reads_what_fit_wrote(tiny_base, instance_dir, tmp_path, kind):
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.sampling import load_pipeline, pipeline_from_module
    from dreambooth_pl.tools.evaluate import evaluate_suite
    from dreambooth_pl.tools.export import export
    from dreambooth_pl.tools.sample import sample

    torch.manual_seed(0)
    cli = DreamBoothCLI(args=fit_args(tiny_base, instance_dir, None, str(tmp_path / "fit"), steps=2,
                                      **{"model.lora.adapter": kind, "model.optim.learning_rate": 1e-2,
                                         "model.lora.train_text_encoder": "true"}))
    run = Path(cli.trainer.log_dir)
    fitted = run / LORA_FILE
    assert read_adapter(fitted).kind == kind

    out = Path(sample(base=tiny_base, out=str(tmp_path / "samples"), prompt="a photo of sks dog", lora=str(fitted),
                      sampler=SamplerSettings(steps=2), height=64, width=64, dtype="float32", device="cpu"))
    assert list(out.parent.glob("*.png"))  # sample returns its manifest.json
    metrics = evaluate_suite(lora=str(fitted), base=tiny_base, instance_dir=str(SAMPLE), token="sks",
                             class_name="dog", out=str(tmp_path / "eval"), num_prompts=1, images_per_prompt=1,
                             sampler=SamplerSettings(steps=2), resolution=64, clip_weights=None, dino_weights=None,
                             pres_images=0, device="cpu")
    assert all(-1.0 <= metrics[m] <= 1.0 for m in ("clip_i", "clip_t", "dino"))

    kohya = export(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "kohya.safetensors"), "kohya")
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in load_file(kohya))
    from_file = _latents(load_pipeline(tiny_base, [(str(fitted), 1.0)], dtype="float32", device="cpu"))
    from_kohya = _latents(load_pipeline(tiny_base, [(kohya, 1.0)], dtype="float32", device="cpu"))
    cli.model.eval()
    live = _latents(pipeline_from_module(cli.model))
    base = _latents(load_pipeline(tiny_base, [], dtype="float32", device="cpu"))
    torch.testing.assert_close(from_kohya, from_file, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_file, live, atol=1e-5, rtol=0)
    assert (from_file - base).abs().max() > 1e-3  # the adapter changes the images, so equality means something

