"""Held-out validation loss (data.photos.held_out): the split, fixed noise and timesteps, identical values for the
same weights in separate runs, a falling curve over a 30-step CPU fit on the tiny base, logged to TensorBoard."""
from __future__ import annotations

import glob
import shutil

import pytest
import torch

from conftest import SAMPLE, fit_args, write_images
from dreambooth_pl.data.validation import hold_out
from dreambooth_pl.validation import fixed_noise, fixed_timesteps

STEPS, EVERY = 30, 5


def test_hold_out_takes_the_last_photos_and_keeps_one_for_training(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    assert hold_out(paths, 0, "instance") == (paths, [])
    assert hold_out(paths, 1, "instance") == (paths[:3], paths[3:])
    with pytest.raises(ValueError, match="data.photos.held_out=4 would hold out all 4 class image"):
        hold_out(paths, 4, "class")


def test_noise_and_timesteps_are_fixed_per_photo():
    assert fixed_timesteps(1000).tolist() == [125, 375, 625, 875]
    assert torch.equal(fixed_noise(3, (4, 8, 8)), fixed_noise(3, (4, 8, 8)))
    assert not torch.equal(fixed_noise(3, (4, 8, 8)), fixed_noise(1_000_003, (4, 8, 8)))
    torch.manual_seed(0)
    a = torch.rand(2)
    torch.manual_seed(0)
    fixed_noise(0, (4,))
    assert torch.equal(torch.rand(2), a)  # the global RNG is not touched


@pytest.fixture(scope="module")
def fitted(tiny_base, tmp_path_factory):
    """A 30-step fit on 4 dog photos and 4 class images, one of each held out, validated every 5 steps."""
    from dreambooth_pl.cli import DreamBoothCLI

    root = tmp_path_factory.mktemp("val")
    inst = root / "instance"
    inst.mkdir()
    for p in sorted(SAMPLE.glob("*.jpg"))[:4]:
        shutil.copy(p, inst / p.name)
    write_images(root / "class", 4, size=(48, 48))
    args = fit_args(tiny_base, str(inst), str(root / "class"), str(root), steps=STEPS,
                    **{"data.photos.held_out": 1, "trainer.val_check_interval": EVERY,
                       "trainer.num_sanity_val_steps": 0, "checkpoint.every_n_train_steps": STEPS,
                       "model.optim.learning_rate": 1e-3})
    torch.manual_seed(0)
    return DreamBoothCLI(args=args), root


def _scalars(root, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(f"{root}/**/events.out.tfevents*", recursive=True)[0])
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_held_out_loss_is_logged_and_falls(fitted):
    cli, root = fitted
    dm = cli.datamodule
    assert [p.name for p in dm.held_out.items[0][0].paths] == [sorted(SAMPLE.glob("*.jpg"))[3].name]
    assert len(dm.instance.paths) == 3 and len(dm.prior.paths) == 3 and len(dm.held_out) == 2
    curve = _scalars(root, "val/loss")
    # Lightning logs validation at the step count of the batch that triggered it (1-based step - 1)
    assert sorted(curve) == [s - 1 for s in range(EVERY, STEPS + 1, EVERY)]
    inst, prior = _scalars(root, "val/loss_instance"), _scalars(root, "val/loss_prior")
    for step, value in curve.items():
        assert value == pytest.approx(inst[step] + prior[step], rel=1e-6)  # prior_loss_weight 1
    values = [curve[s] for s in sorted(curve)]
    print("val/loss every 5 steps:", [round(v, 5) for v in values])
    assert values[-1] < values[0] - 0.01  # measured: 2.133 at step 5, 2.104 at step 30


def test_same_weights_give_the_same_value_in_separate_runs(fitted):
    cli, root = fitted
    import lightning as L

    def validate() -> dict:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, val_check_interval=EVERY)
        return trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]

    first, second = validate(), validate()
    assert first == second  # bit for bit: noise, timesteps and latents do not depend on the run or its RNG
    final = _scalars(root, "val/loss")[STEPS - 1]
    assert first["val/loss"] == pytest.approx(final, rel=1e-6)  # the fit's last validation: the same weights


def test_a_fractional_validation_interval_is_refused(tiny_base, subject_dirs, tmp_path):
    from dreambooth_pl.cli import DreamBoothCLI

    inst, cls = subject_dirs
    with pytest.raises(ValueError, match="data.photos.held_out needs trainer.val_check_interval as a number of steps"):
        DreamBoothCLI(args=fit_args(tiny_base, inst, cls, str(tmp_path), **{"data.photos.held_out": 1}))


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric HeldOutLoss was called before")  # sums set here
def test_loss_terms_are_means_over_their_own_photos_and_absent_without_them():
    from dreambooth_pl.validation import HeldOutLoss

    metric = HeldOutLoss(prior_loss_weight=0.5)
    metric.instance += 3.0 * 4  # one photo at 4 timesteps, mean 3
    metric.n_instance += 4
    assert {k: float(v) for k, v in metric.compute().items()} == {"loss": 3.0, "loss_instance": 3.0}
    metric.prior += 2.0 * 4 + 4.0 * 4  # two class images, means 2 and 4
    metric.n_prior += 8
    metric._computed = None  # torchmetrics caches compute() until the next update
    assert {k: float(v) for k, v in metric.compute().items()} == {"loss": 4.5, "loss_instance": 3.0,
                                                                 "loss_prior": 3.0}
