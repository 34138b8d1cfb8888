"""DreamBoothDataModule: every bad-input case fails (or warns) in setup() with a message naming the file and fix."""
import re
import warnings
from pathlib import Path

import pytest

from dreambooth_pl.data.datamodule import DreamBoothDataModule
from dreambooth_pl.data.images import ImageIntakeError
from dreambooth_pl.data.settings import PhotoSettings, PriorSettings
from conftest import write_images


def _dm(instance_dir, class_dir=None, priors=None, **kw) -> DreamBoothDataModule:
    """A data module of the subject's photos (prior preservation with ``class_dir``); ``priors`` adds to its
    priors group, ``kw`` gives other arguments."""
    prior = dict(dir=str(class_dir), prompt="a photo of dog", num_images=4) if class_dir else dict(enabled=False)
    return DreamBoothDataModule(PhotoSettings(str(instance_dir), "a photo of sks dog"),
                                PriorSettings(**{**prior, **(priors or {})}), **{"resolution": 32, **kw})


def test_pairs_subject_and_priors(subject_dirs):
    inst, cls = subject_dirs
    dm = _dm(inst, cls)
    dm.setup("fit")
    assert len(dm.instance.paths) == 2 and len(dm.prior.paths) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["is_prior"].tolist() == [False, True]
    assert batch["prompt"] == ["a photo of sks dog", "a photo of dog"]


def test_without_prior_preservation_no_class_dir_is_needed(subject_dirs):
    dm = _dm(subject_dirs[0])
    dm.setup("fit")
    assert dm.prior is None
    assert next(iter(dm.train_dataloader()))["is_prior"].tolist() == [False]


def test_one_photo_and_two_hundred_priors(tmp_path):
    write_images(tmp_path / "one", 1, size=(40, 40))
    write_images(tmp_path / "many", 201, size=(32, 32), seed=3)
    dm = _dm(tmp_path / "one", tmp_path / "many", priors={"num_images": 200})
    dm.setup("fit")
    assert len(dm.instance.paths) == 1 and len(dm.prior.paths) == 200


def test_missing_instance_dir(tmp_path):
    with pytest.raises(ImageIntakeError, match=f"instance dir '{tmp_path / 'nope'}' does not exist"):
        _dm(tmp_path / "nope").setup("fit")


def test_empty_instance_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageIntakeError, match="instance dir .*empty' holds no images.*add the instance photos"):
        _dm(tmp_path / "empty").setup("fit")


@pytest.mark.parametrize("n_class", [0, 3])
def test_too_few_class_images_says_how_to_generate_them(subject_dirs, tmp_path, n_class):
    cls = tmp_path / f"cls{n_class}"
    write_images(cls, n_class)
    cls.mkdir(exist_ok=True)
    with pytest.raises(ImageIntakeError) as err:
        _dm(subject_dirs[0], cls).setup("fit")
    msg = str(err.value)
    assert f"has {n_class} image(s) but data.priors.num_images is 4" in msg
    assert "python -m dreambooth_pl generate-class-images" in msg and str(cls) in msg


def test_non_image_files_are_skipped_in_one_warning(subject_dirs):
    inst = Path(subject_dirs[0])
    (inst / "notes.docx").write_bytes(b"PK\x03\x04")
    (inst / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftyp")
    (inst / "00.txt").write_text("a photo of sks dog, close up")  # a caption is not a stray file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = _dm(inst)
        dm.setup("fit")
    skipped = [w for w in caught if "non-image" in str(w.message)]
    assert len(skipped) == 1
    assert "clip.mp4" in str(skipped[0].message) and "notes.docx" in str(skipped[0].message)
    assert "00.txt" not in str(skipped[0].message)
    assert len(dm.instance.paths) == 2


def test_corrupt_image_is_named(subject_dirs):
    bad = Path(subject_dirs[1]) / "0002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(ImageIntakeError, match=re.escape(str(bad))):
        _dm(subject_dirs[0], subject_dirs[1]).setup("fit")


@pytest.mark.parametrize("kwargs, message", [
    ({"resolution": 30}, "data.resolution must be a positive multiple of 8.*got 30; try 32"),
    ({"resolution": 0}, "data.resolution must be a positive multiple of 8"),
    ({"batch_size": 0}, "data.batch_size must be >= 1"),
    ({"priors": {"enabled": True}}, "prior preservation needs data.priors.dir and data.priors.prompt"),
    ({"caption_dropout": -0.1}, r"data.caption_dropout must be a probability in \[0, 1\]"),
])
def test_bad_settings_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dm(tmp_path, **kwargs)


def test_groups_given_as_dicts_are_built_and_kept_as_plain_data(tmp_path):
    """LightningCLI and a run's saved config hand the groups over as dicts; hparams (what a checkpoint stores,
    read with weights_only) hold plain dicts, the attributes the typed groups."""
    dm = DreamBoothDataModule({"dir": str(tmp_path), "prompt": "a photo of sks dog"},
                              {"dir": "c", "prompt": "a photo of dog", "generation": {"sampler": {"steps": 3}}},
                              {"flip": 0.5}, {"source": "off"})
    assert dm.priors.generation.sampler.steps == 3 and dm.crops.flip == 0.5 and dm.masks.source == "off"
    assert dm.hparams.priors["generation"]["sampler"]["steps"] == 3 and dm.hparams.photos["dir"] == str(tmp_path)


def test_a_caption_that_is_not_utf8_is_named_with_the_images(subject_dirs):
    """It failed mid-training without naming the file; now setup() lists it before any model loads."""
    image = sorted(Path(subject_dirs[0]).iterdir())[0]
    caption = image.with_suffix(".txt")
    caption.write_bytes("a photo of sks dog in the café".encode("latin-1"))
    with pytest.raises(ImageIntakeError, match=re.escape(str(caption)) + ".*not UTF-8.*save it as UTF-8"):
        _dm(subject_dirs[0], subject_dirs[1]).setup("fit")


def test_class_dir_problems_are_named_before_the_base_draws(subject_dirs, monkeypatch, tmp_path):
    """With generate_class_images, bad files in the class dir counted as drawn and a read-only class dir gave a raw
    Errno: both are now named (with data.priors.dir) before the base loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded before the class dir was checked")

    monkeypatch.setattr("dreambooth_pl.tools.generate_class_images.generate_class_images", refuse)
    gen = dict(priors={"generate": True, "num_images": 8}, base_model="unused")
    bad = Path(subject_dirs[1]) / "0001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageIntakeError, match=re.escape(str(bad))):
        _dm(subject_dirs[0], subject_dirs[1], **gen).setup("fit")
    bad.unlink()
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    from dreambooth_pl.io import OutputError

    with pytest.raises(OutputError, match=r"afile/class.*not writable.*data\.priors\.dir"):
        _dm(subject_dirs[0], blocker / "class", **gen).setup("fit")
