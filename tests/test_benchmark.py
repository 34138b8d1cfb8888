"""tools/benchmark.py on the tiny base (CPU): the real fit path runs and the result carries every reported field."""
from __future__ import annotations

import json


def test_benchmark_tiny_training_path(tiny_base, tmp_path):
    from dreambooth_pl.tools.benchmark import benchmark

    out = tmp_path / "results.jsonl"
    line = benchmark(preset="t4-16gb", steps=1, warmup=2, base=tiny_base, base_preset="tiny", work=str(tmp_path),
                     out=str(out), profile=str(tmp_path / "prof.txt"), count_flops=True,
                     overrides=["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.resolution=32",
                                "--model.perf.compile_blocks=false"])
    result = json.loads(line)
    assert json.loads(out.read_text().splitlines()[-1]) == result
    assert result["steps"] == 1 and result["devices"] == 1 and result["s_per_step"] > 0
    assert result["images_per_s"] == 2 / result["s_per_step"]  # one instance + one prior image per step
    assert result["tflop_per_step"] > 0 and len(result["warmup_s"]) == 2
    assert result["trainable_params_m"] > 0 and result["optimizer_state_mib"] > 0
    assert result["time_to_lora_min"] * 60 >= result["wall_s"] > 0 and result["recipe_steps"] == 1000
    assert {"gpu", "torch", "diffusers", "peft", "lightning", "date"} <= set(result)
    prof = (tmp_path / "prof.txt").read_text()
    assert "aten::" in prof and "no device kernels recorded" in prof  # top ops of the timed step; CPU: no GPU gaps
    assert (tmp_path / "prof.txt.trace.json.gz").stat().st_size > 0
    ops = (tmp_path / "prof.txt.ops.txt").read_text().splitlines()  # which op and shapes the time went to
    assert ops[0].startswith("aten ops' own CPU time") and any("aten::mm" in r and "[[" in r for r in ops[2:])
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").exists()
