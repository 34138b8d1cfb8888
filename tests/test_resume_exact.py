"""Exact resume: a run SIGKILLed mid-step and resumed with --ckpt_path last ends with the same LoRA, bit for bit,
as an uninterrupted run; so does a finished run extended to a larger max_steps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, fit_args
from safetensors.torch import load_file
from test_faults import SendSignal

from dreambooth_pl.callbacks.fault_tolerance import StoppedBySignal
from dreambooth_pl.cli import DreamBoothCLI
from dreambooth_pl.module import DreamBoothLoRA

STEPS = 3
PAUSE_ENV = "DREAMBOOTH_TEST_PAUSE_MARKER"


class PauseAt(L.Callback):
    """In the child run only (``$DREAMBOOTH_TEST_PAUSE_MARKER`` set): during step ``step``, after its backward and
    before its optimizer update, write the marker file and wait to be killed."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        marker = os.environ.get(PAUSE_ENV)
        if marker and trainer.global_step + 1 == self.step:
            Path(marker).write_text(str(trainer.global_step))
            time.sleep(600)


def _args(tiny_base, subject_dirs, root, steps, *extra):
    # random flips and crops on, so the augmentation RNG must be restored too
    return fit_args(tiny_base, *subject_dirs, str(root), steps=steps, **{"data.crops.flip": 0.5}) + list(extra)


def _lora(root) -> dict[str, torch.Tensor]:
    (path,) = Path(root).glob("lightning_logs/version_0/pytorch_lora_weights.safetensors")
    return load_file(path)


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _resume(root, *extra) -> None:
    config = Path(root) / "lightning_logs" / "version_0" / "config.yaml"
    DreamBoothCLI(args=["fit", "--config", str(config), "--ckpt_path", "last", *extra])


def test_sigkill_resume_and_changed_max_steps_are_bit_exact(tiny_base, subject_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_PL_TRUST_CONFIG", "1")  # the run's config names the test's PauseAt callback
    killed = tmp_path / "killed"
    marker = tmp_path / "paused"
    cmd = [sys.executable, "-m", "dreambooth_pl", *_args(tiny_base, subject_dirs, killed, STEPS),
           "--trainer.callbacks+=test_resume_exact.PauseAt", "--trainer.callbacks.step=2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), **{PAUSE_ENV: str(marker)},
               DREAMBOOTH_PL_TRUST_CONFIG="1",  # PauseAt is a test class, outside the allowed class paths
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # same CPU reduction order as this process's runs
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the uninterrupted reference trains in this process while the child runs
        DreamBoothCLI(args=_args(tiny_base, subject_dirs, tmp_path / "reference", STEPS))
        reference = _lora(tmp_path / "reference")
        deadline = time.time() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "child never reached step 2"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)  # mid-step 2: the optimizer update of step 2 never happens
        assert child.wait(60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert marker.read_text() == "1"
    ckpt = killed / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1
    assert not list(killed.glob("lightning_logs/version_0/*.safetensors"))  # no export from the killed run
    _resume(killed, "--trainer.callbacks=[]")
    _assert_bit_identical(_lora(killed), reference)

    extended = tmp_path / "extended"  # finish at 2 steps (LoRA exported), then resume to STEPS
    DreamBoothCLI(args=_args(tiny_base, subject_dirs, extended, 2))
    assert not torch.equal(next(iter(_lora(extended).values())), next(iter(reference.values())))
    _resume(extended, f"--trainer.max_steps={STEPS}")
    _assert_bit_identical(_lora(extended), reference)


def test_each_example_draws_its_own_noise_wherever_it_lands():
    """An example's noise and timestep follow its stream-wide id, not the batch, micro-batch or rank it lands in
    (one process with the global batch trains what DDP does); two examples draw differently, reproducibly."""
    from dreambooth_pl.noise import NoiseSchedule

    noise = NoiseSchedule({"num_train_timesteps": 1000})
    cpu = torch.device("cpu")
    together = noise.draw(3, [4, 5], (4, 8, 8), latent_eps=True, offset=True, device=cpu)
    alone = [noise.draw(3, [i], (4, 8, 8), latent_eps=True, offset=True, device=cpu) for i in (5, 4)]
    for k in ("eps", "noise", "offset", "t"):
        assert torch.equal(together[k][0], alone[1][k][0]) and torch.equal(together[k][1], alone[0][k][0])
    assert not torch.equal(together["noise"][0], together["noise"][1])
    other_seed = noise.draw(4, [4], (4, 8, 8), latent_eps=False, offset=False, device=cpu)
    assert set(other_seed) == {"noise", "t"} and not torch.equal(other_seed["noise"][0], together["noise"][0])


def test_hand_built_batches_of_one_step_draw_different_noise():
    """With gradient accumulation, global_step repeats; a hand-built batch (no ids from the streams) still gets
    different ids on each micro-batch, reproducibly."""
    module = DreamBoothLoRA(base_model="never-loaded")
    ids = []
    for micro in (0, 1, 0):
        module._micro_batch = micro  # what on_train_batch_start sets from batch_idx % accumulate_grad_batches
        ids.append(module.example_ids({"prompt": ["a", "b"]}))
    assert ids[0] == ids[2] and not set(ids[0]) & set(ids[1])


def test_signal_mid_accumulation_waits_for_the_step_and_resumes_exactly(tiny_base, subject_dirs, tmp_path):
    """SIGTERM on the first micro-batch of step 1 (accumulate_grad_batches=2): the checkpoint is written after the
    step's second micro-batch, and resuming from it gives the uninterrupted run's LoRA bit for bit."""
    acc = "--trainer.accumulate_grad_batches=2"
    DreamBoothCLI(args=_args(tiny_base, subject_dirs, tmp_path / "reference", 2, acc))
    stopped = tmp_path / "stopped"
    cli = DreamBoothCLI(args=_args(tiny_base, subject_dirs, stopped, 2, acc)[1:], run=False)
    cli.trainer.callbacks.insert(0, SendSignal(1, signal.SIGTERM))
    with pytest.raises(StoppedBySignal):
        cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(stopped / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1
    _resume(stopped)
    _assert_bit_identical(_lora(stopped), _lora(tmp_path / "reference"))
