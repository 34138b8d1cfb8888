"""Class-prior generation: seeded per image, resumes without regenerating, manifest, fit-config and DataModule
entry points, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from dreambooth_pl.io import OWNER_FILE, OutputError, read_png_metadata
from dreambooth_pl.sampling import SamplerSettings
from dreambooth_pl.tools.generate_class_images import ClassImageSettings, generate_class_images

FAST = dict(sampler=SamplerSettings(steps=2), progress=False, dtype="float32", device="cpu")


def test_resume_draws_only_the_missing_images_with_their_own_seeds(tiny_base, tmp_path):
    out = tmp_path / "class"
    generate_class_images(tiny_base, "a photo of dog", str(out), num=2, seed=10, batch_size=2, **FAST)
    timing = json.loads((out / "manifest.json").read_text())["timing"]
    # loading, the first batch and the last batch's writes are apart from the per-image rate the benchmark scales
    assert timing["images"] == 2 and timing["write_tail_s"] >= 0
    # each of the four figures is rounded to 1 ms in the manifest: the sum may exceed the whole by up to 2 ms
    assert timing["load_s"] + timing["first_batch_s"] + timing["write_tail_s"] <= timing["seconds"] + 3e-3
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.png")}
    assert sorted(first) == ["class_00000.png", "class_00001.png"]
    msg = generate_class_images(tiny_base, "a photo of dog", str(out), num=3, seed=10, **FAST)
    assert "generated 1" in msg
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == first[p.name] for p in out.glob("*.png") if p.name in first)
    assert read_png_metadata(out / "class_00002.png")["seed"] == 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"] == "a photo of dog"
    assert {k: v["seed"] for k, v in manifest["images"].items()} == {f"class_0000{i}.png": 10 + i for i in range(3)}
    assert manifest["images"]["class_00002.png"]["steps"] == 2 and manifest["images"]["class_00002.png"]["base"]
    assert "nothing to do" in generate_class_images(tiny_base, "a photo of dog", str(out), num=3, **FAST)
    assert [p.name for p in out.glob(".*")] == [OWNER_FILE]  # no temporary files left behind; the folder is marked
    # image i depends on seed + i only: a fresh folder that starts at index 2 draws the same pixels
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for i in range(2):  # two foreign images count towards num, and their names are skipped
        Image.new("RGB", (64, 64)).save(fresh / f"class_0000{i}.png")
    generate_class_images(tiny_base, "a photo of dog", str(fresh), num=3, seed=10, **FAST)
    a, b = np.asarray(Image.open(out / "class_00002.png")), np.asarray(Image.open(fresh / "class_00002.png"))
    assert np.abs(a.astype(int) - b).max() <= 2


def test_fit_config_fills_the_arguments(tiny_base, tmp_path):
    cfg = tmp_path / "fit.yaml"
    out = tmp_path / "cls"
    cfg.write_text(yaml.safe_dump({"model": {"base_model": tiny_base}, "data": {
        "priors": {"dir": str(out), "prompt": "a photo of cat", "num_images": 1}, "resolution": 32}}))
    generate_class_images(fit_config=str(cfg), **FAST)
    meta = read_png_metadata(out / "class_00000.png")
    assert (meta["prompt"], meta["width"], meta["base"]) == ("a photo of cat", 32, tiny_base)


def test_bad_inputs_fail_clearly(tiny_base, tmp_path):
    out = tmp_path / "class"
    generate_class_images(tiny_base, "a photo of dog", str(out), num=1, **FAST)
    with pytest.raises(ValueError, match="holds images of prompt 'a photo of dog', not 'a photo of cat'"):
        generate_class_images(tiny_base, "a photo of cat", str(out), num=2, **FAST)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="output dir .*file/sub' is not writable"):
        generate_class_images(tiny_base, "a photo of dog", str(blocker / "sub"), num=1, **FAST)
    with pytest.raises(ValueError, match="needs --prompt"):
        generate_class_images(tiny_base, None, str(out), num=1, **FAST)
    with pytest.raises(ValueError, match="multiple of 8"):
        generate_class_images(tiny_base, "a photo of dog", str(out), num=5, resolution=60, **FAST)


def test_datamodule_generates_missing_class_images_when_asked(tiny_base, subject_dirs, tmp_path,
                                                              monkeypatch):
    from dreambooth_pl.data.datamodule import DreamBoothDataModule
    from dreambooth_pl.data.images import ImageIntakeError
    from dreambooth_pl.data.settings import PhotoSettings, PriorSettings

    instance_dir, _ = subject_dirs
    photos = PhotoSettings(instance_dir, "a photo of sks dog")
    priors = dict(dir=str(tmp_path / "gen"), prompt="a photo of dog", num_images=2)
    with pytest.raises(ImageIntakeError, match="generate-class-images.*data.priors.generate: true"):
        DreamBoothDataModule(photos, PriorSettings(**priors), resolution=32).setup("fit")
    # a prior cache of its own: drawn here, not linked from another test's draw of the same key
    generation = ClassImageSettings(sampler=SamplerSettings(steps=1), batch_size=2, cache_dir=str(tmp_path / "pc"))
    dm = DreamBoothDataModule(photos, PriorSettings(**priors, generate=True, generation=generation), resolution=32,
                              base_model=tiny_base)
    import dreambooth_pl.data.images as images

    inspected = []
    real = images._inspect
    monkeypatch.setattr(images, "_inspect", lambda path, res: inspected.append(path.name) or real(path, res))
    dm.setup("fit")
    assert len(dm.prior.paths) == 2 and Image.open(dm.prior.paths[0]).size == (32, 32)
    # the priors this process just drew are not decoded again by the check (the instance photos are)
    assert not [n for n in inspected if n.startswith("class_")]
    from dreambooth_pl.data.class_images import drawn_here

    assert all(drawn_here(p, 32) for p in dm.prior.paths) and not drawn_here(dm.prior.paths[0], 64)
    # a prior changed since it was written is checked again: a truncated file is named, not trained on
    first = dm.prior.paths[0]
    truncated = first.read_bytes()[:100]
    first.unlink()  # a new file: the drawn one is linked into the session's shared prior cache, which must stay whole
    first.write_bytes(truncated)
    assert not drawn_here(first, 32)
    dm2 = DreamBoothDataModule(photos, PriorSettings(**priors, generate=True, generation=generation), resolution=32,
                               base_model=tiny_base)
    with pytest.raises(ImageIntakeError, match="class_00000.png"):
        dm2.setup("fit")


def test_a_second_subject_of_the_class_reuses_the_priors_and_the_manifest_says_so(tiny_base, tmp_path):
    cache = str(tmp_path / "cache")
    first, second, other = tmp_path / "subject1", tmp_path / "subject2", tmp_path / "other"
    kw = dict(num=3, seed=4, cache_dir=cache, resolution=32, **FAST)
    assert "generated 3 class image(s), reused 0" in generate_class_images(tiny_base, "a photo of dog", str(first), **kw)
    msg = generate_class_images(tiny_base, "a photo of dog", str(second), **kw)
    assert "generated 0 class image(s), reused 3" in msg
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["last_run"]["reused"] == 3 and manifest["last_run"]["drawn"] == 0
    assert {v["source"] for v in manifest["images"].values()} == {"prior cache"}
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in manifest["images"])
    assert json.loads((first / "manifest.json").read_text())["images"]["class_00000.png"]["source"] == "drawn"
    # another key (steps), more images (new seeds), or the cache off: drawn
    fewer_steps = dict(kw, sampler=SamplerSettings(steps=1))
    assert "generated 3" in generate_class_images(tiny_base, "a photo of dog", str(other), **fewer_steps)
    more = generate_class_images(tiny_base, "a photo of dog", str(second), **dict(kw, num=4))
    assert "generated 1 class image(s), reused 0" in more
    assert "generated 2" in generate_class_images(tiny_base, "a photo of dog", str(tmp_path / "off"),
                                                  **dict(kw, num=2, cache=False))
    keys = list((tmp_path / "cache").glob("*/key.json"))
    assert len(keys) == 2 and {json.loads(k.read_text())["steps"] for k in keys} == {1, 2}
    # guided by SDXL's zeroed negative prompt, drawn with its constant cross-attentions (zero_negative.py): keyed
    assert all(json.loads(k.read_text())["constant_negative"] for k in keys)
    negative = dict(kw, sampler=SamplerSettings(steps=2, negative_prompt="blurry"))
    generate_class_images(tiny_base, "a photo of dog", str(tmp_path / "neg"), **dict(negative, num=1))
    assert sum("constant_negative" not in json.loads(k.read_text()) for k in (tmp_path / "cache").glob("*/key.json")) == 1
    old = generate_class_images(tiny_base, "a photo of dog", str(tmp_path / "old"), constant_negative=False,
                                **dict(kw, num=1))
    assert "generated 1" in old and len(list((tmp_path / "cache").glob("*/key.json"))) == 4
    from dreambooth_pl.io import read_png_metadata

    used = {name: read_png_metadata(tmp_path / name / "class_00000.png")["constant_negative"]
            for name in ("subject1", "neg", "old")}
    assert used == {"subject1": True, "neg": False, "old": False}  # what each draw ran, in its PNG


def test_a_rebuilt_base_gets_a_new_key(tmp_path):
    from dreambooth_pl.data.prior_cache import PriorCache, prior_key

    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "w.safetensors").write_bytes(b"1")
    key = dict(prompt="a photo of dog", negative_prompt=None, scheduler="euler", steps=25, guidance=5.0, height=1024,
               width=1024)
    a = PriorCache(str(tmp_path), prior_key(str(base), None, **key)).name
    assert PriorCache(str(tmp_path), prior_key(str(base), None, **key)).name == a
    (base / "unet" / "w.safetensors").write_bytes(b"22")
    assert PriorCache(str(tmp_path), prior_key(str(base), None, **key)).name != a


def test_gpu_draws_with_the_one_kernel_geglu_get_their_own_key(tmp_path, monkeypatch):
    """The GPU sampler's default GEGLU rounds once where diffusers' rounds twice (prior_sampler.py), so its draws
    key apart from earlier ones; CPU draws, compiled blocks and quantized bases keep the keys they had."""
    import torch

    from dreambooth_pl.data.prior_cache import prior_key
    from dreambooth_pl.prior_defaults import default_fused_geglu

    import dreambooth_pl.block_ops as block_ops

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(block_ops, "uses_kernel", lambda device: device.type == "cuda")  # Triton or not
    assert default_fused_geglu(cuda, False, "float16")
    assert not any((default_fused_geglu(cpu, False, "float16"), default_fused_geglu(cuda, True, "float16"),
                    default_fused_geglu(cuda, False, "float8"), default_fused_geglu(cuda, False, "nf4")))
    from dreambooth_pl.data.class_images import ClassImageSettings, fuses_geglu

    assert fuses_geglu(ClassImageSettings(), cuda) and not fuses_geglu(ClassImageSettings(), cpu)
    assert not fuses_geglu(ClassImageSettings(fused_geglu=False), cuda)  # keeps the earlier draws' key
    assert fuses_geglu(ClassImageSettings(fused_geglu=True), cpu)
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "w.safetensors").write_bytes(b"1")
    args = (str(base), None, "a photo of dog", None, "euler", 25, 5.0, 1024, 1024)
    assert prior_key(*args, fused_geglu=True) == dict(prior_key(*args), fused_geglu=True)
    assert "fused_geglu" not in prior_key(*args, fused_geglu=False)


def test_gpu_draws_that_read_the_vae_straight_into_bf16_get_their_own_key(tmp_path, monkeypatch):
    """Since the sampler hands its VAE to training it reads it straight into its bf16 decode dtype, where it went
    through the UNet's fp16 before: an fp32 VAE file then decodes at another rounding, so those draws key apart;
    draws whose VAE dtype is the UNet's (a CPU, a GPU without bf16) and quantized or parked bases keep their keys."""
    import torch

    import dreambooth_pl.prior_defaults as pd
    from dreambooth_pl.data.prior_cache import prior_key

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(pd, "has_bf16", lambda device: device.type == "cuda")
    assert pd.reads_vae_direct(cuda, None, None, "float16", False)
    assert not any((pd.reads_vae_direct(cpu, None, None, "float16", False),
                    pd.reads_vae_direct(cuda, None, None, "float8", False),
                    pd.reads_vae_direct(cuda, None, None, "float16", True),
                    pd.reads_vae_direct(cuda, "bfloat16", None, "float16", False)))
    monkeypatch.setattr(pd, "has_bf16", lambda device: False)  # a T4: fp16 UNet and VAE (upcast), as before
    assert not pd.reads_vae_direct(cuda, None, None, "float16", False)
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "w.safetensors").write_bytes(b"1")
    args = (str(base), None, "a photo of dog", None, "euler", 25, 5.0, 1024, 1024)
    assert prior_key(*args, vae_direct=True) == dict(prior_key(*args), vae_direct=True)
    assert "vae_direct" not in prior_key(*args)


def test_gpu_draws_with_the_triton_norms_and_nhwc_get_their_own_key(tmp_path, monkeypatch):
    """The Triton GroupNorms round once where diffusers rounds after each op, and NHWC runs other convolution
    kernels (fused_norms.py): such draws key apart, each switch by its own entry; CPU draws, compiled blocks and
    ``false`` keep the keys they had. NHWC follows the norms unless set."""
    import torch

    import dreambooth_pl.fused_norms as fused_norms
    from dreambooth_pl.data.class_images import ClassImageSettings, draws_nhwc, fuses_norms
    from dreambooth_pl.data.prior_cache import prior_key

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: device.type == "cuda")  # Triton or not
    s = ClassImageSettings()
    assert fuses_norms(s, cuda) and draws_nhwc(s, cuda)
    assert not fuses_norms(s, cpu) and not draws_nhwc(s, cpu)
    assert not fuses_norms(ClassImageSettings(compile_blocks=True), cuda)
    assert not draws_nhwc(ClassImageSettings(fused_norms=False), cuda)  # NHWC alone copies around every norm
    assert fuses_norms(ClassImageSettings(channels_last=False), cuda) and not draws_nhwc(
        ClassImageSettings(channels_last=False), cuda)
    assert draws_nhwc(ClassImageSettings(fused_norms=False, channels_last=True), cuda)  # asked for: as asked
    assert not draws_nhwc(ClassImageSettings(channels_last=True), cpu)  # a CPU draw keeps NCHW
    # asked for where the kernels cannot run: the patched norms run diffusers' ops, and the key says so
    assert not fuses_norms(ClassImageSettings(fused_norms=True), cpu)
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "w.safetensors").write_bytes(b"1")
    args = (str(base), None, "a photo of dog", None, "euler", 25, 5.0, 1024, 1024)
    assert prior_key(*args, fused_norms=True, channels_last=True) == dict(prior_key(*args), fused_norms=True,
                                                                          channels_last=True)
    assert not {"fused_norms", "channels_last"} & set(prior_key(*args, fused_norms=False, channels_last=False))
    # the VAE's NHWC decode (session 11) keys apart from the draws before it, which decoded NCHW
    assert prior_key(*args, channels_last=True, vae_channels_last=True) == dict(prior_key(*args), channels_last=True,
                                                                                vae_channels_last=True)
    assert "vae_channels_last" not in prior_key(*args, channels_last=True)
