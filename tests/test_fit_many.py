"""fit-many: a subjects file on one fit config; each class's priors drawn once by one upstream task and shared by
its subjects; one LoRA per subject on a local Ray with 2 workers; one results table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from dreambooth_pl.tools.fit_many import fit_many, load_subjects, nested, subject_jobs

REPO = Path(__file__).resolve().parents[1]


def subjects_file(tmp: Path, base: str, photos: str) -> Path:
    """3 subjects in 2 classes (the same photos: the plumbing is under test) on configs/smoke.yaml, tiny sizes."""
    spec = {"base_config": [str(REPO / "configs/smoke.yaml")], "out": str(tmp / "out"),
            "overrides": {"model.base_model": base, "model.random_base": None, "trainer.max_steps": 1,
                          "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                          "data.resolution": 32, "data.priors.num_images": 2,
                          "data.priors.generation": {"sampler": {"steps": 1}, "batch_size": 2}},
            "subjects": [{"name": "rex", "photos": photos, "identifier": "sks", "class_name": "dog"},
                         {"name": "tom", "photos": photos, "identifier": "ohwx", "class_name": "cat"},
                         {"name": "max", "photos": photos, "identifier": "zwx", "class_name": "dog",
                          "overrides": {"model.lora.rank": 2}}]}
    path = tmp / "subjects.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_subjects_of_one_class_share_one_prior_task(tiny_base, subject_dirs, tmp_path):
    path = subjects_file(tmp_path, tiny_base, subject_dirs[0])
    jobs, priors, needs = subject_jobs(load_subjects(str(path)))
    assert [j.name for j in jobs] == ["rex", "tom", "max"] and len(priors) == 2
    assert needs["rex"] == needs["max"] != needs["tom"]
    rex = yaml.safe_load((tmp_path / "out/subjects/rex.yaml").read_text())
    photos, rex_priors = rex["data"]["photos"], rex["data"]["priors"]
    assert photos["prompt"] == "a photo of sks dog" and rex_priors["prompt"] == "a photo of dog"
    assert rex_priors["dir"].startswith(str(tmp_path / "out/priors/a-photo-of-dog-"))
    assert rex_priors["generate"] is False  # the upstream task draws them, once
    assert nested({"a.b.c": 1, "a.d": 2}) == {"a": {"b": {"c": 1}, "d": 2}}


def test_bad_subjects_files_name_the_file(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("base_config: a.yaml\nout: o\nsubjects: [{name: x, photos: p, identifier: i}]\n")
    with pytest.raises(SystemExit, match=r"(?s)s.yaml.*required: class_name"):
        load_subjects(str(bad))
    bad.write_text("base_config: a.yaml\nout: o\nsubjects: [{name: x, photos: p, identifier: i, class_name: c},"
                   " {name: x, photos: q, identifier: j, class_name: c}]\n")
    with pytest.raises(SystemExit, match=r"unique names.*\['x'\]"):
        load_subjects(str(bad))
    with pytest.raises(SystemExit, match="does not exist"):
        load_subjects(str(tmp_path / "missing.yaml"))
    bad.write_text("base_config: a.yaml\nout: o\nsubjects: [{name: x, photos: p, identifier: i, class_name: c, "
                   "overrides: {data.class_dir: cls}}]\n")
    with pytest.raises(SystemExit, match=r"^fit-many: data.class_dir moved to data.priors.dir .*subjects file"):
        load_subjects(str(bad))  # before any subject's fit
    load_subjects(str(REPO / "configs/subjects/example.yaml"))


@pytest.mark.slow
def test_three_subjects_in_two_classes_draw_priors_twice_and_write_three_loras(tiny_base, subject_dirs, tmp_path,
                                                                               local_ray):
    path = subjects_file(tmp_path, tiny_base, subject_dirs[0])
    summary = fit_many(str(path), workers=2)
    out = tmp_path / "out"
    assert summary.startswith("3 subject(s), 2 class-prior folder(s), 0 not done")
    folders = sorted((out / "priors").iterdir())
    assert len(folders) == 2
    for f in folders:  # each drawn once, to the count, by the prior task (the fits draw nothing)
        manifest = json.loads((f / "manifest.json").read_text())
        assert len(manifest["images"]) == 2 and len(list(f.glob("*.png"))) == 2
    with open(out / "results.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"rex", "tom", "max"} and {r["status"] for r in rows.values()} == {"done"}
    assert rows["rex"]["priors"] == rows["max"]["priors"] != rows["tom"]["priors"]
    for name in rows:
        lora = load_file(out / "runs" / name / "pytorch_lora_weights.safetensors")
        assert lora and Path(rows[name]["lora"]).is_file()
    ranks = {k: v.shape for k, v in load_file(out / "runs/max/pytorch_lora_weights.safetensors").items()}
    assert min(min(s) for s in ranks.values()) == 2  # max's own override reached its fit
    assert "rex" in (out / "results.md").read_text()
