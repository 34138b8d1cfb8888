"""The sample command: PNGs whose text chunks reproduce them, a contact sheet, a manifest, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_sampling import lora_file  # noqa: F401  (a non-zero LoRA for the tiny base)

from dreambooth_pl.__main__ import main
from dreambooth_pl.sampling import SamplingError
from dreambooth_pl.io import OWNER_FILE, OutputError, read_png_metadata
from dreambooth_pl.tools.sample import sample


def test_sample_writes_pngs_that_reproduce_themselves(tiny_base, lora_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="float16 sampling on CPU"):  # the default dtype; CPU runs it in float32
        main(["sample", "--base", tiny_base, "--out", str(out), "--prompt", "a photo of {token} {class}",
              "--token", "zwx", "--lora", lora_file, "--lora_scale", "0.7", "--images_per_prompt", "2",
              "--seed", "5", "--sampler.steps", "2", "--batch_size", "1", "--sampler.scheduler", "euler_a",
              "--sampler.negative_prompt", "blurry", "--device", "cpu"])
    assert capsys.readouterr().out.strip().endswith("manifest.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in manifest["images"]] == [("a photo of zwx dog", 5),
                                                                      ("a photo of zwx dog", 6)]
    assert manifest["settings"]["loras"] == [[lora_file, 0.7]]
    first = out / manifest["images"][0]["file"]
    meta = read_png_metadata(first)
    assert (meta["scheduler"], meta["steps"], meta["negative_prompt"], meta["seed"]) == ("euler_a", 2, "blurry", 5)
    assert (meta["dtype"], meta["device"]) == ("float32", "cpu") and meta["versions"]["diffusers"]
    assert meta["random_base"] == "tiny"  # drawn from make-base's random weights, and the PNG says so
    assert "Negative prompt: blurry" in Image.open(first).text["parameters"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == 2 * 64 and sheet.height > 64
    assert [p.name for p in out.glob(".*")] == [OWNER_FILE]  # no temp file; the folder is marked as sample's
    again = sample(from_png=str(first), out=str(tmp_path / "again"), device="cpu")
    (record,) = json.loads(open(again).read())["images"]
    a, b = np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "again" / record["file"]))
    assert (a == b).all()  # bit-identical at the same batch size (other sizes may round +-1 level)
    other = np.asarray(Image.open(out / manifest["images"][1]["file"]))
    assert np.abs(a.astype(int) - other).mean() > 1  # seeds 5 and 6 are different images


def test_list_suites(capsys):
    main(["sample", "--list_suites", "true"])
    out = capsys.readouterr().out
    assert "dreambench_object (25 prompts), e.g. 'a sks dog in the jungle'" in out and "recontext" in out
    main(["list-suites", "--token", "zwx", "--class_name", "cat"])
    assert "'a painting of zwx cat at Oktoberfest'" in capsys.readouterr().out


def test_bad_inputs_fail_before_any_model_loads(tmp_path):
    with pytest.raises(SamplingError, match="3 seed.*2 image.*1 prompt.*images_per_prompt 2"):
        sample(base="unused", out=str(tmp_path), prompt="a dog", images_per_prompt=2, seeds=[1, 2, 3])
    with pytest.raises(SamplingError, match="2 LoRA file.*1 lora_scale"):
        sample(base="unused", out=str(tmp_path), prompt="a dog", lora=["a.safetensors", "b.safetensors"],
               lora_scale=0.5)
    with pytest.raises(ValueError, match="exactly one of --prompt, --prompt_file, --suite"):
        sample(base="unused", out=str(tmp_path), prompt="a dog", suite="recontext")
    with pytest.raises(ValueError, match="exactly one of"):
        sample(base="unused", out=str(tmp_path))
    with pytest.raises(SamplingError, match="width must be a positive multiple of 8"):
        sample(base="unused", out=str(tmp_path), prompt="a dog", width=1000 + 1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not writable"):
        sample(base="unused", out=str(blocker / "out"), prompt="a dog")
