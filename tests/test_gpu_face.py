"""GPU: the shipped recipe on a person with SubjectMetrics' face identity (dlib's real weights) and the held-out
validation loss, under 16-mixed, with its s/step printed beside the plain recipe's.

Needs ``.face/`` carried to the GPU machine (docs/gpu-tests.md): dlib's two model files laid out as the
``face_recognition_models`` package (``benchmarks/gpu.sh`` puts ``.face`` on ``PYTHONPATH``) and the public-domain
astronaut photo; the dlib-bin wheel comes from ``.whl/``.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_gpu_acceptance import CALLBACKS, SIZE, finite_losses, recipe_args

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
FACE = REPO / ".face"
STEPS, EVERY = 10, 5


@pytest.fixture(scope="module")
def person(tmp_path_factory):
    """(full-size random base, instance dir of 3 astronaut photos at 1024 px, class dir, scratch dir)."""
    from PIL import Image, ImageOps

    from dreambooth_pl.tools.benchmark import build_base, prepare_inputs

    photo = FACE / "astronaut.png"
    if not photo.is_file():
        pytest.fail(f"{photo} is missing: prepare .face/ as docs/gpu-tests.md says and carry it.")
    base = build_base(str(REPO / "data" / "_cache" / "sdxl-random"), "sdxl")
    work = tmp_path_factory.mktemp("face")
    _, cls = prepare_inputs(work / "inputs")
    inst = work / "astronaut"
    inst.mkdir()
    with Image.open(photo) as im:
        big = im.convert("RGB").resize((1024, 1024), Image.BICUBIC)
    big.save(inst / "a.png")
    ImageOps.mirror(big).save(inst / "b.png")
    big.crop((64, 0, 960, 896)).resize((1024, 1024), Image.BICUBIC).save(inst / "c.png")  # held out (last)
    return base, str(inst), cls, work


class StepClock:
    """Wall time between consecutive training-batch starts (the median leaves out the steps that sample)."""

    def __init__(self):
        self.starts: list[float] = []

    def seconds_per_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.starts[1:], self.starts[2:]))  # the first: warm-up


def fit_timed(args: list[str]):
    import lightning as L

    from dreambooth_pl.cli import DreamBoothCLI

    clock = StepClock()

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.synchronize()
            clock.starts.append(time.perf_counter())

    cli = DreamBoothCLI(args=args[1:], run=False)  # parsed without the verb: the clock joins the callbacks
    cli.trainer.callbacks.append(Clock())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, clock.seconds_per_step()


def test_recipe_with_face_identity_and_held_out_loss(person):
    from PIL import Image, ImageOps

    from dreambooth_pl.callbacks.subject_metrics import SubjectMetrics
    from dreambooth_pl.metrics.face import SAME_PERSON

    work = person[3]
    _, plain_s = fit_timed(recipe_args(person, work / "plain", STEPS))
    cli, face_s = fit_timed(recipe_args(person, work / "face", STEPS, *CALLBACKS,
                                        "--trainer.callbacks.face_weights=dlib", "--data.photos.held_out=1",
                                        f"--trainer.val_check_interval={EVERY}"))
    print(f"s/step: recipe {plain_s:.4f}, recipe + SampleGrid + SubjectMetrics(face) + held-out loss every "
          f"{EVERY} steps {face_s:.4f} (medians; sampling steps excluded)")
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == STEPS and model.unet.dtype == torch.float16
    finite_losses(trainer)
    for k in ("val/loss", "val/loss_instance", "val/loss_prior"):
        assert torch.isfinite(trainer.logged_metrics[k]), k
    scores = next(cb for cb in trainer.callbacks if isinstance(cb, SubjectMetrics)).last_scores
    assert {"val/clip_i", "val/clip_t", "val/dino", "val/face_match", "val/face_none"} <= set(scores)
    assert 0.0 <= scores["val/face_match"] <= 1.0 and scores["val/face_none"] == int(scores["val/face_none"])
    cb = next(cb for cb in trainer.callbacks if isinstance(cb, SubjectMetrics))
    with Image.open(FACE / "astronaut.png") as im:
        mirrored = ImageOps.mirror(im.convert("RGB")).resize((SIZE, SIZE))
    same = cb.score_images(trainer, torch.device("cuda"), [mirrored], ["a photo of sks person"])
    assert same["val/face_sim"] > SAME_PERSON and same["val/face_match"] == 1.0
    assert np.isfinite(plain_s) and np.isfinite(face_s)


def test_pivotal_recipe_with_face_identity_20_steps(person):
    """Issue 23's GPU must-show in one run: the recipe (its prompt "a photo of rraj person") with pivotal tuning
    (configs/pivotal.yaml) and SubjectMetrics' face identity, 20 steps under 16-mixed, s/step beside the plain
    recipe's."""
    from dreambooth_pl.callbacks.subject_metrics import SubjectMetrics

    work, steps = person[3], 20
    _, plain_s = fit_timed(recipe_args(person, work / "plain20", steps))
    cli, pivotal_s = fit_timed(recipe_args(person, work / "pivotal20", steps, "--config",
                                           str(REPO / "configs" / "pivotal.yaml"), *CALLBACKS,
                                           "--trainer.callbacks.face_weights=dlib"))
    print(f"s/step: recipe {plain_s:.4f}, recipe + pivotal + SampleGrid + SubjectMetrics(face) {pivotal_s:.4f} "
          f"(medians over {steps} steps; sampling steps excluded)")
    assert cli.trainer.global_step == steps and cli.model.pivotal is not None
    finite_losses(cli.trainer)
    scores = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SubjectMetrics)).last_scores
    assert {"val/face_match", "val/face_none"} <= set(scores) and np.isfinite(pivotal_s)
