"""Pivotal tuning's embedding files (token_files.py): the advanced script's layout, loaded into diffusers' pipeline
with ``load_textual_inversion`` on both encoders, the same prompt embeddings as training's encoders; sample and
evaluate-suite load them beside the LoRA; A1111-style files by their name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.pivotal import PivotalSettings, export_embeddings
from dreambooth_pl.sampling import SamplerSettings
from dreambooth_pl.settings import LoraSettings
from dreambooth_pl.token_files import (TokenFileError, beside, load_into, prompt_rewriter, read_embeddings,
                                       write_embeddings)

PROMPTS = ["a photo of sks dog", "sks", "a photo of dog"]


@pytest.fixture(scope="module")
def pivotal_run(tiny_base, tmp_path_factory):
    """(module with moved new rows, run folder holding its LoRA and ``version_0_emb.safetensors``, that file)."""
    torch.manual_seed(0)
    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False), pivotal=PivotalSettings("sks"))
    module.configure_model()
    with torch.no_grad():  # what training does to them, far enough to matter
        for layer in module.pivotal.layers:
            layer.rows.add_(torch.randn(layer.rows.shape) * layer.rows.std() * 3)
    run = tmp_path_factory.mktemp("runs") / "version_0"
    run.mkdir()
    module.export_lora(str(run / "pytorch_lora_weights.safetensors"))
    return module, run, export_embeddings(module, str(run))


def _pipeline(base):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32)


def _encode(pipe, prompt):
    emb, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    return emb, pooled


def test_the_file_is_the_advanced_scripts_layout(pivotal_run):
    module, run, path = pivotal_run
    assert path == str(run / "version_0_emb.safetensors")  # f"{output_dir}/{Path(output_dir).name}_emb.safetensors"
    saved = load_file(path)
    assert sorted(saved) == ["clip_g", "clip_l"]
    assert saved["clip_l"].shape == (2, 32) and saved["clip_g"].dtype == torch.float32
    assert torch.equal(saved["clip_g"], module.pivotal.layers[1].rows.detach())
    emb = read_embeddings(path)
    assert (emb.identifier, emb.tokens) == ("sks", ("<s0>", "<s1>"))
    assert beside(run / "pytorch_lora_weights.safetensors") == [path] == beside(run)


def test_load_textual_inversion_on_both_encoders_gives_trainings_prompt_embeddings(tiny_base, pivotal_run):
    module, _, path = pivotal_run
    state = load_file(path)
    pipe = _pipeline(tiny_base)
    plain = _encode(pipe, "a photo of <s0><s1> dog")[0]  # before loading: the tokens are plain text
    # the advanced script's model card, verbatim
    pipe.load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    rewrite = prompt_rewriter([path])
    with torch.no_grad():
        for prompt in PROMPTS:
            emb, pooled = _encode(pipe, rewrite(prompt))
            ours, ours_pooled = module.encode_text([prompt])
            assert (emb - ours).abs().max() <= 1e-6 and (pooled - ours_pooled).abs().max() <= 1e-6, prompt
        assert (plain - module.encode_text([PROMPTS[0]])[0]).abs().max() > 1e-2  # the rows are what matched


def test_sample_loads_the_embeddings_beside_the_lora(tiny_base, pivotal_run, tmp_path):
    from dreambooth_pl.tools.sample import sample

    _, run, path = pivotal_run
    common = dict(base=tiny_base, prompt="a photo of {token} dog", token="sks", lora=str(run),
                  sampler=SamplerSettings(steps=2), dtype="float32", device="cpu")
    manifest = json.loads(open(sample(out=str(tmp_path / "with"), **common)).read())
    assert manifest["settings"]["embeddings"] == [path]
    assert manifest["images"][0]["prompt"] == "a photo of sks dog"  # recorded as written
    without = json.loads(open(sample(out=str(tmp_path / "without"), embeddings=[], **common)).read())
    first = tmp_path / "with" / manifest["images"][0]["file"]
    a = np.asarray(Image.open(first), dtype=int)
    b = np.asarray(Image.open(tmp_path / "without" / without["images"][0]["file"]), dtype=int)
    assert np.abs(a - b).mean() > 1  # the new tokens changed the image
    again = json.loads(open(sample(from_png=str(first), out=str(tmp_path / "again"), device="cpu")).read())
    assert (np.asarray(Image.open(tmp_path / "again" / again["images"][0]["file"]), dtype=int) == a).all()


def test_evaluate_suite_draws_with_the_embeddings(tiny_base, pivotal_run, tmp_path):
    from dreambooth_pl.io import read_png_metadata
    from dreambooth_pl.tools.evaluate import evaluate_suite

    from conftest import SAMPLE

    _, run, path = pivotal_run
    kw = dict(lora=str(run / "pytorch_lora_weights.safetensors"), base=tiny_base, instance_dir=str(SAMPLE),
              token="sks", class_name="dog", num_prompts=1, images_per_prompt=1, sampler=SamplerSettings(steps=2),
              resolution=64, clip_weights=None, dino_weights=None, pres_images=0, device="cpu")
    evaluate_suite(out=str(tmp_path / "e"), **kw)
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["settings"]["embeddings"] == [path]
    (png,) = (tmp_path / "e" / "samples").glob("*.png")
    assert read_png_metadata(png)["embeddings"] == [path]
    evaluate_suite(out=str(tmp_path / "none"), embeddings=[], **kw)
    (other,) = (tmp_path / "none" / "samples").glob("*.png")
    assert np.abs(np.asarray(Image.open(png), dtype=int) - np.asarray(Image.open(other), dtype=int)).mean() > 1


def test_an_a1111_style_file_is_triggered_by_its_name(tiny_base, tmp_path):
    from dreambooth_pl.sampling import load_pipeline

    rows = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}
    save_file(rows, tmp_path / "myface.safetensors")  # no header of ours: A1111 and ComfyUI use the file name
    emb = read_embeddings(tmp_path / "myface.safetensors")
    assert (emb.identifier, emb.tokens) == ("myface", ("<myface_0>",))
    pipe = load_pipeline(tiny_base, dtype="float32", device="cpu", embeddings=[str(tmp_path / "myface.safetensors")])
    assert prompt_rewriter([str(tmp_path / "myface.safetensors")])("a myface dog") == "a <myface_0> dog"
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<myface_0>")]
        assert torch.equal(row, rows[key][0])


def test_bad_files_name_the_file_and_the_fix(tiny_base, tmp_path):
    save_file({"clip_l": torch.zeros(2, 32)}, tmp_path / "half.safetensors")
    with pytest.raises(TokenFileError, match="half.safetensors.*no clip_g"):
        read_embeddings(tmp_path / "half.safetensors")
    write_embeddings(tmp_path / "wide.safetensors", {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)},
                     "sks", ["<s0>", "<s1>"])
    pipe = _pipeline(tiny_base)
    with pytest.raises(TokenFileError, match="trained on another base"):
        load_into(pipe, [str(tmp_path / "wide.safetensors")])
    narrow = {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(2, 32)}
    for name in ("a.safetensors", "b.safetensors"):
        write_embeddings(tmp_path / name, narrow, name[0], ["<s0>", "<s1>"])
    with pytest.raises(TokenFileError, match="b.safetensors.*'<s0>'.*a.safetensors"):
        load_into(_pipeline(tiny_base), [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
