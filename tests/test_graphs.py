"""CUDA-graph replay of the UNet call (graphs.py): refused where it cannot be exact, ignored on a CPU, and on a GPU
the graphed step trains the same adapters as the eager one."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from conftest import fit_args
from dreambooth_pl.cli import DreamBoothCLI
from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.settings import LoraSettings, PerfSettings


@pytest.mark.parametrize("key", ["lora.train_text_encoder", "lora.dropout", "perf.compile_blocks"])
def test_settings_that_break_a_fixed_capture_are_refused_by_name(key):
    group, name = key.split(".")
    lora = LoraSettings(**{name: 0.1 if name == "dropout" else True} if group == "lora" else {})
    perf = PerfSettings(cuda_graph=True, **{name: True} if group == "perf" else {})
    with pytest.raises(ValueError, match=f"model.perf.cuda_graph .* model.{key} breaks"):
        DreamBoothLoRA(lora=lora, perf=perf)


def test_on_cpu_it_warns_and_trains_eagerly(tiny_base, subject_dirs, tmp_path):
    eager = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path / "a"), steps=2))
    with pytest.warns(UserWarning, match="cuda_graph needs a CUDA device"):
        graphed = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path / "b"), steps=2,
                                              **{"model.perf.cuda_graph": "true"}))
    a, b = eager.model.trainable_parameters(), graphed.model.trainable_parameters()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Start(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.params = {k: v.detach().clone() for k, v in pl_module.trainable_parameters().items()}


def _fit(base, dirs, root, graph: bool, steps: int, **over):
    args = fit_args(base, *dirs, str(root), steps=steps, **{
        "trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed", "model.perf.cache": "all",
        "model.perf.cuda_graph": str(graph).lower(), "data.resolution": "64", "trainer.accumulate_grad_batches": 2,
        "checkpoint.every_n_train_steps": steps, **over})
    start = _Start()
    cli = DreamBoothCLI(args=args, trainer_defaults={"callbacks": [start]})
    return cli, start.params


FAST = ("fused_lora", "fused_blocks")  # the fast preset's kernels


@pytest.mark.gpu
@pytest.mark.parametrize("precision,checkpointing,switches", [
    ("32-true", 0, ()), ("32-true", 1, ()), ("32-true", 2, ()), ("bf16-mixed", 1, ()), ("bf16-mixed", 0, FAST),
    ("bf16-mixed", 0, FAST + ("group_qkv",))])
def test_graphed_steps_equal_eager_steps_on_gpu(tiny_base, subject_dirs, tmp_path, precision, checkpointing,
                                                switches):
    """20 graphed steps (2 micro-batches each) against 20 eager steps from the same start, with the graph really
    replayed (no eager fallback): in fp32 the adapters agree to rounding; under bf16 the two updates point the same
    way (Adam turns bf16 rounding of near-zero gradients into full-size steps, so elementwise equality is not the
    test there). ``switches``: ``model.perf`` switches on in both runs: the fast preset's kernels (fused LoRA with bulk
    bf16 adapter copies, bf16 norms, compiled GEGLU)."""
    over = {"model.perf.gradient_checkpointing": str(checkpointing > 0).lower(),
            "model.perf.checkpoint_every": max(checkpointing, 1), "trainer.precision": precision}
    over.update({f"model.perf.{k}": "true" for k in switches})
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    eager, start = _fit(tiny_base, subject_dirs, tmp_path / "eager", False, 20, **over)
    graphed, start_g = _fit(tiny_base, subject_dirs, tmp_path / "graph", True, 20, **over)
    assert graphed.model.graph_stats == {"replays": 40, "fallbacks": 0}  # 20 steps x 2 micro-batches
    t = graphed.model.timings  # the first step's parts, which phases.json reports (callbacks/progress.py)
    assert t["graph_warmup"] > 0 and t["graph_capture"] > 0 and t["builds"] >= 0, t
    a, b = eager.model.trainable_parameters(), graphed.model.trainable_parameters()
    assert all(torch.equal(start[k], start_g[k]) for k in start)
    da = torch.cat([(a[k].detach().cpu().float() - start[k].cpu().float()).flatten() for k in a])
    db = torch.cat([(b[k].detach().cpu().float() - start[k].cpu().float()).flatten() for k in a])
    rel, cos = float((da - db).norm() / da.norm()), float(torch.nn.functional.cosine_similarity(da, db, dim=0))
    le, lg = float(eager.trainer.logged_metrics["train/loss"]), float(graphed.trainer.logged_metrics["train/loss"])
    detail = f"rel={rel:.3g} cos={cos:.4f} loss eager={le:.6g} graphed={lg:.6g}"
    print(detail)
    assert da.norm() > 0 and np.isfinite(lg), detail
    if precision == "32-true":
        assert rel <= 1e-3 and abs(le - lg) <= 1e-4 * abs(le), detail
    else:
        assert cos >= 0.9 and abs(le - lg) <= 5e-2 * abs(le), detail
