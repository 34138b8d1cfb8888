"""Lightning DDP on 2 CPU processes (gloo), the real ``python -m dreambooth_pl fit`` path: the ranks train on
disjoint batches that together are the single-process stream, their adapters stay identical (gradients are
all-reduced), one process with the global batch computes the mean of their losses, and only rank 0 exports. Two
processes started as two "nodes" (``NODE_RANK`` 0/1, ``--trainer.num_nodes 2``, docs/scale.md) and two devices of
one node both train the adapters of that one process, within 1e-5."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, fit_args

RECORDER = '''
import json, os
import lightning as L


class Recorder(L.Callback):
    """Per rank: each step's loss and a fingerprint of every example; the adapters' checksum at the end."""

    def __init__(self, out: str):
        self.out, self.rows = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        px = batch["pixel_values"].double()
        self.rows.append({"loss": float(outputs["loss"]), "fp": [round(float(x.sum()), 3) for x in px]})

    def on_train_end(self, trainer, pl_module):
        lora = sum(float(p.detach().double().abs().sum()) for p in pl_module.trainable_parameters().values())
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rows": self.rows, "lora": lora, "world": trainer.world_size}, f)
'''


# AdamW moves a component by about lr * g / (|g| + eps): where the tiny base's gradient is at float-noise level
# (~1e-8, self-attention keys), the default eps 1e-8 turns the last bits of a different order of float sums into
# 0.17 of a step (1.7e-5 at lr 1e-4). An eps of 1e-6 keeps those components' steps small, so the comparison
# tests the runs' batches and noise, not the sign of float noise.
EPS = {"model.optim.adam_epsilon": 1e-6}


def _recorder_arg(out) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "recorder.Recorder", "init_args": {"out": str(out)}})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_base, subject_dirs, tmp_path):
    from dreambooth_pl.data.datamodule import DreamBoothDataModule
    from dreambooth_pl.data.datasets import PairedStream
    from dreambooth_pl.data.settings import PhotoSettings, PriorSettings

    inst, cls = subject_dirs
    (tmp_path / "recorder.py").write_text(RECORDER)
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    # no export.dirpath: the export goes to the run's log dir, which rank 0 must not resolve alone at the end (a
    # collective: it hung the 2-GPU recipe test), and a last.ckpt is written at the end of the epoch under DDP
    args = fit_args(tiny_base, inst, cls, str(ddp_out), steps=2, **{"trainer.devices": 2, "trainer.strategy": "ddp",
                    "checkpoint.every_n_train_steps": 5}, **EPS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), OMP_NUM_THREADS="1",
               DREAMBOOTH_PL_TRUST_CONFIG="1")  # Recorder is a test class, outside the allowed class paths
    proc = subprocess.run([sys.executable, "-m", "dreambooth_pl", *args, _recorder_arg(ddp_out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((ddp_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)

    # sharding: per step the ranks see different examples, and together the single-process stream's batches
    dm = DreamBoothDataModule(PhotoSettings(inst, "a photo of sks dog"), PriorSettings(True, cls, "a photo of dog", 4),
                              resolution=32)
    dm.setup("fit")
    stream = PairedStream(dm.instance, dm.prior, 32, 1, seed=0)
    expected = sorted(round(float(x.double().sum()), 3) for b in range(4) for x in stream.batch(b)["pixel_values"])
    seen = [sorted(fp for row in r["rows"] for fp in row["fp"]) for r in ranks]
    assert sorted(seen[0] + seen[1]) == expected
    # each class image comes once per epoch (4 positions here); the 2 instance photos cycle, so compare priors
    priors = [{row["fp"][1] for row in r["rows"]} for r in ranks]
    assert len(priors[0]) == len(priors[1]) == 2 and not priors[0] & priors[1]

    # all-reduced gradients keep the ranks' adapters identical (and training moved them)
    assert abs(ranks[0]["lora"] - ranks[1]["lora"]) < 1e-6 * ranks[0]["lora"]

    # one process with the global batch (2) sees the ranks' examples, draws each one's noise (keyed by the example,
    # not the rank: NoiseSchedule.draw) and so computes the mean of the ranks' losses
    sys.path.insert(0, str(tmp_path))
    try:
        from unittest import mock

        from dreambooth_pl.cli import DreamBoothCLI

        with mock.patch.dict(os.environ, DREAMBOOTH_PL_TRUST_CONFIG="1"):  # Recorder is a test class
            DreamBoothCLI(args=fit_args(tiny_base, inst, cls, str(single_out), steps=2, **{"data.batch_size": 2}, **EPS)
                          + [_recorder_arg(single_out)])
    finally:
        sys.path.remove(str(tmp_path))
    single = json.loads((single_out / "rank0.json").read_text())
    for step in (0, 1):
        assert sorted(single["rows"][step]["fp"]) == sorted(fp for r in ranks for fp in r["rows"][step]["fp"])
        mean = sum(r["rows"][step]["loss"] for r in ranks) / 2
        assert torch.isclose(torch.tensor(single["rows"][step]["loss"]), torch.tensor(mean), rtol=1e-5)

    # rank-0-only export: one file, written once
    assert len(list(ddp_out.glob("lightning_logs/version_*/pytorch_lora_weights.safetensors"))) == 1
    assert len(list(ddp_out.glob("lightning_logs/version_*/checkpoints/last.ckpt"))) == 1
    assert (proc.stdout + proc.stderr).count("LoRA written to") == 1

    # the same run as two "nodes" of one device each, started by hand as a cluster's launcher would (no LOCAL_RANK:
    # Lightning's environment reads NODE_RANK, MASTER_ADDR and MASTER_PORT): the same global batch, the same ranks
    nodes_out = tmp_path / "nodes"
    nodes_args = fit_args(tiny_base, inst, cls, str(nodes_out), steps=2, **{
        "trainer.devices": 1, "trainer.num_nodes": 2, "trainer.strategy": "ddp", "checkpoint.every_n_train_steps": 5},
        **EPS)
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "dreambooth_pl", *nodes_args], cwd=REPO, text=True,
                              env=dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    two_nodes = list(nodes_out.glob("lightning_logs/version_*/pytorch_lora_weights.safetensors"))
    one_node = list(ddp_out.glob("lightning_logs/version_*/pytorch_lora_weights.safetensors"))
    one_process = list(single_out.glob("lightning_logs/version_*/pytorch_lora_weights.safetensors"))
    assert len(two_nodes) == 1 and len(list(nodes_out.glob("lightning_logs/version_*"))) == 1  # node 1 made none
    # the same adapters as one process with the same global batch; within 1e-5, not bit-equal: the all-reduce sums
    # two ranks' gradients where one process sums one batch's, a different order of float sums
    reference = load_file(one_process[0])
    for run in (two_nodes[0], one_node[0]):
        got = load_file(run)
        assert got.keys() == reference.keys()
        assert max(float((got[k] - reference[k]).abs().max()) for k in got) <= 1e-5, run
