"""SubjectMetrics during a tiny CPU fit: logs val/clip_i, val/clip_t, val/dino and the face identity (dlib's real
weights) of a subject with a face; leaves weights and RNG untouched."""
from __future__ import annotations

import glob

import pytest
import torch

from conftest import face_photos, fit_args
from dreambooth_pl.callbacks.subject_metrics import SubjectMetrics, identifier_from_prompts


@pytest.fixture(scope="module")
def fitted(tiny_base, tmp_path_factory):
    from dreambooth_pl.cli import DreamBoothCLI

    root = tmp_path_factory.mktemp("fit")
    subject = root / "astronaut"  # a person: the face metric has a face to compare with
    subject.mkdir()
    photo = face_photos()["astronaut"]
    photo.save(subject / "a.png")
    photo.resize((300, 300)).save(subject / "b.png")
    args = fit_args(tiny_base, str(subject), None, str(root), steps=2)
    args += ["--trainer.callbacks+=dreambooth_pl.callbacks.subject_metrics.SubjectMetrics",
             "--trainer.callbacks.every_n_steps=1", "--trainer.callbacks.token=sks",
             "--trainer.callbacks.sampler.steps=2",
             "--trainer.callbacks.images_per_prompt=2", "--trainer.callbacks.resolution=64",
             "--trainer.callbacks.clip_weights=null", "--trainer.callbacks.dino_weights=null"]
    torch.manual_seed(0)
    cli = DreamBoothCLI(args=args)
    return cli, root


def test_logs_subject_metrics_each_interval(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, root = fitted
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, SubjectMetrics))
    # the tiny random base draws no face: face_sim has no sample to average, both samples count as no face
    assert set(cb.last_scores) == {"val/clip_i", "val/clip_t", "val/dino", "val/face_match", "val/face_none"}
    assert (cb.last_scores["val/face_match"], cb.last_scores["val/face_none"]) == (0.0, 2.0)
    for v in cb.last_scores.values():
        assert -1.0 <= v <= 2.0
    assert cb._metrics["val/clip_t"].token == "sks"
    events = EventAccumulator(glob.glob(f"{root}/**/events.out.tfevents*", recursive=True)[0])
    events.Reload()
    for tag in ("val/clip_i", "val/clip_t", "val/dino", "val/face_match", "val/face_none"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2]  # every_n_steps=1 over 2 steps; none twice
    assert float(cli.trainer.callback_metrics["val/dino"]) == pytest.approx(cb.last_scores["val/dino"])


def test_scoring_leaves_weights_rng_and_modes_untouched(fitted):
    cli, _ = fitted
    module, cb = cli.model, next(c for c in cli.trainer.callbacks if isinstance(c, SubjectMetrics))
    fit_scores = dict(cb.last_scores)  # scored at the last step, with the same adapters as now
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = {k: p.requires_grad for k, p in module.named_parameters()}
    module.unet.train()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = cb.score(cli.trainer, module)
    assert torch.equal(torch.rand(3), expected_draw)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grads == {k: p.requires_grad for k, p in module.named_parameters()}
    assert module.unet.training
    assert first == pytest.approx(fit_scores, abs=1e-6)  # fixed seeds: the same samples give the same scores


def test_face_sim_of_samples_that_show_the_subject(fitted):
    """Images that show the subject (its photo mirrored, as a well-trained LoRA would draw it) score face_sim within
    dlib's same-person threshold and are all matches; another person is not."""
    from PIL import ImageOps

    from dreambooth_pl.metrics.face import SAME_PERSON

    cli, root = fitted
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, SubjectMetrics))
    photos = face_photos()
    same = cb.score_images(cli.trainer, cli.model.device, [ImageOps.mirror(photos["astronaut"])] * 2, ["a sks"] * 2)
    assert same["val/face_sim"] > SAME_PERSON + 0.2 and (same["val/face_match"], same["val/face_none"]) == (1.0, 0.0)
    other = cb.score_images(cli.trainer, cli.model.device, [photos["hopper"]], ["a sks"])
    assert other["val/face_sim"] < SAME_PERSON and other["val/face_match"] == 0.0
    assert float(cli.trainer.callback_metrics["val/face_sim"]) == pytest.approx(other["val/face_sim"])


def test_identifier_from_prompts():
    assert identifier_from_prompts("a photo of sks dog", "a photo of dog") == "sks"
    assert identifier_from_prompts("a rraj person", "a person") == "rraj"
    assert identifier_from_prompts("a photo of sks dog", None) is None
