"""data/settings.py: each data group refuses its own bad values by full key; check_data what spans them; the CLI
shows and overrides every grouped value."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import REPO
from dreambooth_pl.data.class_images import ClassImageSettings
from dreambooth_pl.data.settings import (CropSettings, MaskSettings, PhotoSettings, PriorSettings, as_group,
                                         check_data)
from dreambooth_pl.sampling import SamplerSettings, SamplingError

PHOTOS = {"dir": "photos", "prompt": "a photo of sks dog"}


@pytest.mark.parametrize("group, kwargs, message", [
    (PhotoSettings, {**PHOTOS, "prompt": " "}, "data.photos.prompt is empty: give the prompt with the identifier"),
    (PhotoSettings, {**PHOTOS, "num_images": 0}, r"data.photos.num_images must be >= 1 or null \(all photos\), got 0"),
    (PhotoSettings, {**PHOTOS, "held_out": -1}, "data.photos.held_out must be >= 0, got -1"),
    (PriorSettings, {"prompt": ""}, "data.priors.prompt is empty: give the class prompt"),
    (PriorSettings, {"num_images": 0}, "data.priors.num_images must be >= 1 with prior preservation, got 0"),
    (CropSettings, {"flip": 1.5}, r"data.crops.flip must be a probability in \[0, 1\], got 1.5"),
    (CropSettings, {"around": "eyes"}, "data.crops.around must be face or null, got 'eyes'"),
    (MaskSettings, {"source": "all"}, "data.masks.source must be off, files or face, got 'all'"),
    (MaskSettings, {"floor": 2.0}, r"data.masks.floor must be a loss weight in \[0, 1\], got 2.0"),
])
def test_each_group_refuses_its_bad_values_by_full_key(group, kwargs, message):
    with pytest.raises(ValueError, match=message):
        group(**kwargs)


def test_prior_preservation_needs_its_class_images_but_the_default_group_builds():
    PriorSettings()  # the signature's default: enabled, no folder yet
    PriorSettings(enabled=False, num_images=0, prompt="")  # nothing is checked when it is off
    with pytest.raises(ValueError, match="prior preservation needs data.priors.dir and data.priors.prompt; set it, "
                                         "or set data.priors.enabled: false"):
        check_data(64, 1, 0.0, PriorSettings())
    with pytest.raises(ValueError, match="needs data.priors.prompt;"):
        check_data(64, 1, 0.0, PriorSettings(dir="cls"))
    check_data(64, 1, 0.0, PriorSettings(dir="cls", prompt="a photo of dog"))


def test_groups_are_frozen_and_dicts_become_groups():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CropSettings().flip = 0.5
    priors = as_group("priors", {"dir": "c", "prompt": "p", "generation": {"sampler": {"steps": 3}, "seed": 2}})
    assert priors.generation == ClassImageSettings(sampler=SamplerSettings(steps=3), seed=2)
    with pytest.raises(SamplingError, match="sampler.scheduler 'fast' is unknown"):
        as_group("priors", {"generation": {"sampler": {"scheduler": "fast"}}})


def test_the_cli_shows_and_overrides_the_groups(capsys):
    from dreambooth_pl.cli import DreamBoothCLI

    with pytest.raises(SystemExit):
        DreamBoothCLI(args=["fit", "--config", str(REPO / "configs/smoke.yaml"), "--data.crops.flip=0.25",
                            "--data.priors.generation.sampler.steps=3", "--data.masks.source=off", "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["photos"] == {"dir": "data/sample/dog", "prompt": "a photo of sks dog", "num_images": None,
                              "held_out": 0}
    assert data["crops"]["flip"] == 0.25 and data["masks"] == {"source": "off", "floor": 0.1}
    assert data["priors"]["generation"]["sampler"] == {"scheduler": "euler", "steps": 3, "guidance": 5.0,
                                                       "negative_prompt": None}
    assert data["resolution"] == 64 and data["priors"]["num_images"] == 4


def test_a_bad_group_value_on_the_command_line_names_the_key():
    from dreambooth_pl.cli import DreamBoothCLI

    with pytest.raises(ValueError, match=r"data.crops.flip must be a probability in \[0, 1\], got 2"):
        DreamBoothCLI(args=["--config", str(REPO / "configs/smoke.yaml"), "--data.crops.flip=2"], run=False)


def test_the_cli_hands_the_data_module_typed_groups(tiny_base, subject_dirs, tmp_path):
    """LightningCLI passes the parsed groups; the module keeps them typed and its hparams plain."""
    from conftest import fit_args
    from dreambooth_pl.cli import DreamBoothCLI

    cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path))[1:] + ["--data.crops.flip=0.5"],
                        run=False)
    dm = cli.datamodule
    assert dm.crops == CropSettings(flip=0.5) and dm.photos == PhotoSettings(subject_dirs[0], "a photo of sks dog")
    assert dm.priors.num_images == 4 and dm.hparams.crops["flip"] == 0.5 and dm.hparams.base_model == tiny_base
