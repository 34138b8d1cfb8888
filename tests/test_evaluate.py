"""evaluate / evaluate-suite / compare-runs on random-weight embedders and the tiny base: scores of the generated
images, the real-images row without self-pairs, resumable sample generation, the comparison table."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SAMPLE, write_images
from dreambooth_pl.data.images import list_images, load_rgb
from dreambooth_pl.io import write_json
from dreambooth_pl.metrics import CLIPIScore, CLIPTScore, DINOScore
from dreambooth_pl.sampling import SamplerSettings
from dreambooth_pl.tools.evaluate import EvaluationError, evaluate, evaluate_suite


def test_evaluate_scores_the_generated_images(tmp_path, random_embedders):
    gen, bare, real = tmp_path / "gen", tmp_path / "bare", tmp_path / "real"
    files = write_images(gen, 4, seed=1)
    prompts = ["a sks dog"] * 2 + ["a sks dog in snow"] * 2
    write_json(gen / "manifest.json",
               {"images": [{"file": f.name, "prompt": p, "seed": i} for i, (f, p) in enumerate(zip(files, prompts))]})
    write_images(bare, 4, seed=2)
    (tmp_path / "prompts.txt").write_text("a sks dog\na sks dog in snow\n")
    write_images(real, 3, seed=3)
    with pytest.raises(EvaluationError, match="no manifest.json: pass --prompts"):
        evaluate([str(bare)], str(real), str(tmp_path / "out"), clip_weights=None, dino_weights=None)
    torch.manual_seed(0)
    table = evaluate([str(gen), str(bare)], str(real), str(tmp_path / "out"), prompts=str(tmp_path / "prompts.txt"),
                     token="sks", clip_weights=None, dino_weights=None, device="cpu")
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    clip, dino = random_embedders  # seeded as evaluate's own random embedders: the same weights
    real_images = [load_rgb(p) for p in list_images(real)]
    for folder, name in ((gen, str(gen)), (bare, str(bare))):
        images = [load_rgb(p) for p in list_images(folder)]
        ci, t, d = CLIPIScore(clip, real_images), CLIPTScore(clip, "sks"), DINOScore(dino, real_images)
        ci.update(images)
        d.update(images)
        t.update(images, ["a dog"] * 2 + ["a dog in snow"] * 2)  # the manifest's / file's prompts, token removed
        assert rows[name]["clip_i"] == pytest.approx(float(ci.compute()), abs=1e-6)
        assert rows[name]["dino"] == pytest.approx(float(d.compute()), abs=1e-6)
        assert rows[name]["clip_t"] == pytest.approx(float(t.compute()), abs=1e-6)
        assert 0 <= rows[name]["div_dino"] <= 2
    emb = dino.embed_images(real_images)
    assert rows["real images"]["dino"] == pytest.approx(float((emb @ emb.T)[~torch.eye(3, dtype=bool)].mean()),
                                                        abs=1e-6)
    assert "| real images |" in table and "| paper: real images | 0.7740 | 0.8850 |" in table


@pytest.fixture(scope="module")
def lora_run(tiny_base, tmp_path_factory):
    """A fit-like run folder: a non-zero UNet LoRA for the tiny base beside a config.yaml with prior preservation."""
    from diffusers import UNet2DConditionModel

    from dreambooth_pl.adapter.files import save_adapter
    from dreambooth_pl.adapter.kinds import add_adapter, peft_config

    run = tmp_path_factory.mktemp("version_0")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    add_adapter(unet, "lora", peft_config("lora", 4, init=False))
    (run / "config.yaml").write_text("data:\n  with_prior_preservation: true\n")  # a run from before data.priors
    return str(save_adapter(run / "pytorch_lora_weights.safetensors", "lora", {"unet": unet}))


def _suite(tiny_base, lora, out, **over):
    torch.manual_seed(0)
    kw = dict(lora=lora, base=tiny_base, instance_dir=str(SAMPLE), token="sks", class_name="dog", out=str(out),
              num_prompts=2, images_per_prompt=2, sampler=SamplerSettings(steps=2), resolution=64, clip_weights=None,
              dino_weights=None, pres_images=2, device="cpu")
    return evaluate_suite(**(kw | over))


def test_evaluate_suite_resumes_and_compare_runs_tabulates(tiny_base, lora_run, tmp_path):
    out = tmp_path / "eval_euler"
    first = _suite(tiny_base, lora_run, out)
    assert {"clip_i", "clip_t", "dino", "div_dino", "pres", "real_clip_i", "real_dino"} <= set(first)
    assert first["n_images"] == 4
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 4 and len(list((out / "samples_class").glob("*.png"))) == 2
    samples[1].unlink()  # an interrupted run: only the missing sample is drawn again
    kept = {p: p.stat().st_mtime_ns for p in samples if p != samples[1]}
    assert _suite(tiny_base, lora_run, out) == pytest.approx(first, abs=1e-5)  # the redrawn sample: same seed
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()) and samples[1].is_file()
    with pytest.raises(EvaluationError, match="other settings"):
        _suite(tiny_base, lora_run, out, sampler=SamplerSettings(steps=3))

    other = tmp_path / "eval_ddim"
    shutil.copytree(out / "samples", other / "samples")  # reused only if the settings match: they do not
    with pytest.raises(EvaluationError, match="other settings"):
        _suite(tiny_base, lora_run, other, sampler=SamplerSettings("ddim", 2))
    shutil.rmtree(other)
    _suite(tiny_base, lora_run, other, sampler=SamplerSettings("ddim", 2), pres_images=0)
    again = evaluate([str(out / "samples")], str(SAMPLE), str(tmp_path / "again"), token="sks", clip_weights=None,
                     dino_weights=None, device="cpu")  # prompts read back from the PNGs' recorded settings
    assert f"| {first['dino']:.4f} | {first['clip_i']:.4f} | {first['clip_t']:.4f} |" in again
    from dreambooth_pl.__main__ import main

    main(["compare-runs", str(out), str(other), "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[0] == "| scheduler | steps | prior | clip_i | clip_t | dino |"
    assert table[2].startswith("| ddim | 2 | True | ")
    assert table[3].startswith(f"| euler | 2 | True | {first['clip_i']:.4f}")


def test_drift_is_zero_for_an_identity_lora_and_follows_a_real_one(tiny_base, lora_run, tmp_path):
    """``drift`` samples the class prompt with the base alone at the same seeds: a LoRA whose B is 0 (the
    gaussian init, untrained) draws the same images up to float rounding (drift ~0); a non-zero LoRA moves them.

    Why not exactly 0: the adapter's own term is exactly 0, but MKL's CPU sgemm returns results that depend on
    the operands' memory alignment (its "conditional numerical reproducibility"; ``MKL_CBWR=COMPATIBLE`` removes
    the dependence). The pipeline with a LoRA holds its frozen weights at other addresses, so one ``nn.Linear``
    of the UNet on the same input and weights already differs in the last bit (4.8e-7 measured), the sampler
    carries that to ~2e-6 in the images, and one pixel can round to the next 8-bit level: drift_pixel 4.8e-7 on
    one machine, 0 on another. The bound below is ~30 levels over the 64² x 3 values, a thousandth of what a real
    adapter moves (> 0.01). docs/evaluation.md says the same."""
    from diffusers import UNet2DConditionModel

    from dreambooth_pl.adapter.files import save_adapter
    from dreambooth_pl.adapter.kinds import add_adapter, peft_config

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    add_adapter(unet, "lora", peft_config("lora", 4))
    identity = str(save_adapter(tmp_path / "identity.safetensors", "lora", {"unet": unet}))
    kw = dict(num_prompts=1, pres_images=2, class_prompt="a photo of dog", drift=True)
    same = _suite(tiny_base, identity, tmp_path / "identity", **kw)
    moved = _suite(tiny_base, lora_run, tmp_path / "moved", **kw)
    assert same["drift_pixel"] < 1e-5 and same["drift_dino"] == pytest.approx(0, abs=1e-5)
    assert moved["drift_pixel"] > 0.01 and moved["drift_dino"] > 1e-4
    assert 0 < moved["pixel_dist"] < 1
    meta = json.loads((tmp_path / "moved" / "results.json").read_text())["settings"]
    assert (meta["class_prompt"], meta["drift"]) == ("a photo of dog", True)


def test_evaluate_two_folders_reports_face_identity(tmp_path):
    """dlib's real weights: a folder of the subject's face (mirrored and rescaled photos) scores within the
    same-person threshold, a folder of another person and noise does not and counts the image without a face."""
    from PIL import Image, ImageOps

    from conftest import face_photos
    from dreambooth_pl.metrics.face import SAME_PERSON

    photos = face_photos()
    ast = photos["astronaut"]
    real, same, other = tmp_path / "real", tmp_path / "same", tmp_path / "other"
    for folder, images in ((real, [ast, ast.resize((400, 400))]),
                           (same, [ImageOps.mirror(ast), ast.resize((307, 307), Image.BICUBIC)]),
                           (other, [photos["hopper"], Image.new("RGB", (256, 256), (90, 120, 40))])):
        folder.mkdir()
        for i, im in enumerate(images):
            im.save(folder / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a photo of rraj person\n")
    table = evaluate([str(same), str(other)], str(real), str(tmp_path / "out"), prompts=str(tmp_path / "prompts.txt"),
                     token="rraj", clip_weights=None, dino_weights=None, device="cpu")
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert rows[str(same)]["face_sim"] > SAME_PERSON + 0.2 and rows[str(same)]["face_match"] == 1.0
    assert rows[str(same)]["face_none"] == 0
    assert rows[str(other)]["face_sim"] < SAME_PERSON and rows[str(other)]["face_match"] == 0.0
    assert rows[str(other)]["face_none"] == 1
    assert rows["real images"]["face_match"] == 1.0 and rows["real images"]["face_sim"] > SAME_PERSON
    header = table.splitlines()[2]
    assert header.startswith("| images | dino | clip_i | clip_t | face_sim | face_match | face_none |"), header
    assert f"| {rows[str(same)]['face_sim']:.4f} | 1.0000 | 0 |" in table


def test_compare_runs_adds_face_columns_when_present(tmp_path):
    from dreambooth_pl.tools.evaluate import compare_runs

    for name, face in (("a", {"face_sim": 0.55, "face_match": 0.75, "face_none": 1}), ("b", {})):
        settings = {"lora": str(tmp_path / name / "x.safetensors"), "scheduler": name, "steps": 4}
        row = {"clip_i": 0.5, "clip_t": 0.2, "dino": 0.4} | face
        write_json(tmp_path / name / "results.json", {"settings": settings, "rows": {"x.safetensors": row}})
    table = compare_runs([str(tmp_path / "a"), str(tmp_path / "b")]).splitlines()
    assert table[0] == "| scheduler | steps | prior | clip_i | clip_t | dino | face_sim | face_match | face_none |"
    assert table[2] == "| a | 4 | ? | 0.5000 | 0.2000 | 0.4000 | 0.5500 | 0.7500 | 1 |"
    assert table[3] == "| b | 4 | ? | 0.5000 | 0.2000 | 0.4000 |  |  |  |"


def test_a_face_weights_folder_without_the_model_files_is_named_before_any_model_loads(tmp_path):
    from dreambooth_pl.metrics.embedders import EmbedderWeightsError

    write_images(tmp_path / "real", 2)
    with pytest.raises(EmbedderWeightsError, match="lacks shape_predictor_5_face_landmarks.dat"):
        evaluate_suite(lora=__file__, base="no/such-base", instance_dir=str(tmp_path / "real"), token="sks",
                       class_name="dog", out=str(tmp_path / "out"), face_weights=str(tmp_path))


def test_evaluate_suite_of_a_person_counts_samples_without_a_face(tiny_base, lora_run, tmp_path):
    """The tiny random base draws no face: both samples count in face_none, none matches, face_sim has nothing to
    average; the real-images row scores the subject's two photos with each other (dlib's real weights)."""
    from PIL import ImageOps

    from conftest import face_photos
    from dreambooth_pl.metrics.face import SAME_PERSON

    subject = tmp_path / "astronaut"
    subject.mkdir()
    ast = face_photos()["astronaut"]
    ast.save(subject / "a.png")
    ImageOps.mirror(ast).save(subject / "b.png")
    row = _suite(tiny_base, lora_run, tmp_path / "eval", instance_dir=str(subject), num_prompts=1, pres_images=0)
    assert (row["face_none"], row["face_match"]) == (2, 0.0) and "face_sim" not in row
    assert row["real_face_sim"] > SAME_PERSON + 0.2 and row["real_face_match"] == 1.0
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "face_sim | face_match | face_none" in table
