"""tools/benchmark.py on the tiny base (CPU): the real fit path runs and the result carries every reported field."""
from __future__ import annotations

import json
import os

import pytest


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
    assert result["tflop_per_step"] > 0 and result["tflops"] > 0 and len(result["warmup_s"]) == 2
    assert 0 < result["step_s_median"] == result["step_s_max"] and result["step_s_n"] == 1  # from its own marks
    assert result["trainable_params_m"] > 0 and result["optimizer_state_mib"] > 0
    assert result["time_to_lora_min"] * 60 >= result["wall_s"] > 0 and result["recipe_steps"] == 1000
    assert {"gpu", "torch", "diffusers", "peft", "lightning", "date"} <= set(result)
    prof = (tmp_path / "prof.txt").read_text()
    assert "aten::" in prof and "no device kernels recorded" in prof  # top ops of the timed step; CPU: no GPU gaps
    assert (tmp_path / "prof.txt.trace.json.gz").stat().st_size > 0
    ops = (tmp_path / "prof.txt.ops.txt").read_text().splitlines()  # which op and shapes the time went to
    assert ops[0].startswith("aten ops' own CPU time") and any("aten::mm" in r and "[[" in r for r in ops[2:])
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").exists()


def test_reference_timing_reads_every_backward_of_an_unchanged_script(tmp_path):
    """The reference's s/step comes from the end of each backward pass inside its own process (not from two runs'
    wall-time difference, which carried its load-time noise): a stand-in script with the reference's command line
    and a known sleep per step."""
    from dreambooth_pl.tools.benchmark import reference_benchmark

    script = tmp_path / "train_stand_in.py"
    script.write_text(
        "import argparse, time, torch\n"
        "p = argparse.ArgumentParser(); p.add_argument('--max_train_steps', type=int)\n"
        "args, _ = p.parse_known_args()\n"
        "w = torch.zeros(3, requires_grad=True)\n"
        "for step in range(args.max_train_steps):\n"
        "    time.sleep(0.5 if step == 1 else 0.05)  # the last warm-up step is slow: an off-by-one would time it\n"
        "    (w * 2).sum().backward()\n")
    result = reference_benchmark(str(script), "unused-base", tmp_path, steps=4, warmup=2, recipe=False)
    assert result["steps"] == result["step_s_n"] == 4 and 0.045 <= result["step_s_median"] <= 0.2
    assert result["s_per_step"] < 0.3 and result["step_s_max"] < 0.4  # the slow warm-up step is not timed
    assert result["time_to_lora_min"] * 60 >= result["wall_s"] and result["peak_reserved_gib"] == 0
    with pytest.raises(ValueError, match="--warmup >= 1"):
        reference_benchmark(str(script), "unused-base", tmp_path, steps=4, warmup=0, recipe=False)


def test_per_step_times_count_optimizer_steps_under_accumulation(tiny_base, tmp_path):
    """With 2 micro-batches per optimizer step the per-step times are optimizer steps (2 timed steps, 2 times)."""
    import json

    from dreambooth_pl.tools.benchmark import benchmark

    line = benchmark(preset="t4-16gb", steps=2, warmup=1, base=tiny_base, base_preset="tiny", work=str(tmp_path),
                     overrides=["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.resolution=32",
                                "--trainer.accumulate_grad_batches=2"])
    result = json.loads(line)
    assert result["steps"] == result["step_s_n"] == 2 and 0 < result["step_s_median"] <= result["step_s_max"]
    assert result["s_per_step"] > 0
    assert result["tflop_per_step"] is None is result["tflops"]  # not counted: null, not a 0 that reads as measured


def test_priors_mode_times_both_samplers_and_states_the_image_difference(tiny_base, tmp_path):
    from dreambooth_pl.tools.benchmark import benchmark

    result = json.loads(benchmark(preset="priors", steps=2, base=tiny_base, base_preset="tiny", work=str(tmp_path)))
    assert result["s_per_image"] > 0 and result["reference_s_per_image"] > 0 and result["images"] == 2
    assert result["image_diff_max"] <= 1 and result["image_psnr_db"] > 50  # fp32 on the CPU: the same images
    assert (result["dtype"], result["resolution"], result["steps"]) == ("float32", 64, 25)
    assert not result["fuse_qkv"] and result["variants_s_per_image"] == {}  # the switches' A/B runs on a GPU only
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['batch_16'\]; known: .*'batch16'"):
        benchmark(preset="priors", steps=2, base=tiny_base, base_preset="tiny", work=str(tmp_path),
                  variants=["batch_16"])


@pytest.mark.slow
def test_end_to_end_mode_times_the_users_command_with_its_phases(tiny_base, tmp_path):
    """The recipe's fit in its own process, priors drawn: wall time, phases, and the 197-prior/1000-step figure."""
    from dreambooth_pl.tools.benchmark import benchmark

    result = json.loads(benchmark(preset="end-to-end", steps=3, priors=2, base=tiny_base, base_preset="tiny",
                                  work=str(tmp_path), again_steps=1, overrides=["--trainer.accelerator=cpu",
                                                                 "--trainer.precision=32-true", "--data.resolution=32",
                                                                 "--model.optim.name=adamw",
                                                                 "--model.perf.cache=latents"]))
    p = result["phases"]
    assert result["wall_s"] > p["total"] - p["start"] > 0 and p["priors"] > 0 and result["s_per_step"] > 0
    assert result["start_to_first_step_s"] == p["to_first_step_without_priors"]
    assert result["prefetch"] is (os.environ.get("DREAMBOOTH_PL_PREFETCH", "1") != "0")  # the row says which arm
    assert result["extrapolated_min"] * 60 > result["wall_s"]  # 197 priors and 1000 steps take longer than 2 and 3
    # checking and caching 5 photos + 197 priors, scaled from the run's own 5 + 2 images
    assert p["n_images"] == 7 and p["n_priors"] == 2
    assert result["extrapolated_check_and_cache_s"] == pytest.approx((p["cache"] + p["start_data"]) * 202 / 7)
    # the LoRA file exists before the process ends (teardown and exit come after it), after the first step
    assert p["to_first_step_without_priors"] < result["to_lora_s"] <= result["wall_s"]
    assert 0 < result["extrapolated_to_lora_min"] <= result["extrapolated_min"]
    # the second fit of the class (again_steps): the priors linked, the 7 images' latents read from the store
    q = result["again_phases"]
    assert q["n_images_from_store"] == 7 and q["n_images_encoded"] == 0 and p["n_images_encoded"] == 7
    assert result["again_start_to_first_step_s"] == pytest.approx(q["to_first_step_without_priors"] + q["priors"])
