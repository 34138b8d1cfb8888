"""Ablation grids on the tiny base, on a local Ray with 2 workers: a 2x2 grid fits, evaluates (the real
evaluate_suite, random-weight embedders) and reports; each cell's LoRA equals that cell fitted alone; a cell whose
fit is SIGKILLed is retried and resumes; a rerun trains nothing; a resume re-runs only a deleted cell; a failing
cell is recorded and the grid goes on; checkpoint curves; the num_instance_images option."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dreambooth_pl.tools.ablate import ablate
from dreambooth_pl.tools.jobs import STATUS_FILE
from dreambooth_pl.tools.ablation_grid import AblationGrid, Cell, expand, load_grid
from dreambooth_pl.tools.ablation_report import write_report

REPO = Path(__file__).resolve().parents[1]
METRICS = ("clip_i", "clip_t", "dino")
KILLED = "priors.enabled=false__photos.num_images=2"  # the cell whose fit is SIGKILLed at step 1


def tiny_grid(tmp: Path, base: str, inst: str, cls: str, **changes) -> str:
    """configs/ablations/tiny.yaml pointed at the session's tiny base and this test's photos."""
    spec = yaml.safe_load((REPO / "configs/ablations/tiny.yaml").read_text())
    spec["base_config"] = [str(REPO / c) for c in spec["base_config"]]
    spec["out"] = str(tmp / "out")
    spec["overrides"].update({"model.base_model": base, "model.random_base": None, "data.photos.dir": inst,
                              "data.priors.dir": cls})
    spec.update(changes)
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # key order = column and name order
    return str(path)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def statuses(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob(f"*/{STATUS_FILE}")}


@pytest.fixture(scope="module")
def grid_run(tiny_base, tmp_path_factory, one_thread, local_ray):
    """The 2x2 tiny grid (prior on/off x 1/2 photos), fitted and evaluated once for this module, two cells at
    once; cell KILLED's fit process is SIGKILLed once at the start of step 2 (kill_once.KillOnce, conftest)."""
    tmp = tmp_path_factory.mktemp("ablate")
    inst = tmp / "instance"
    inst.mkdir()
    for p in sorted((REPO / "data/sample/dog").glob("*.jpg"))[:2]:
        shutil.copy(p, inst / p.name)
    from conftest import write_images

    write_images(tmp / "class", 4)
    grid = tiny_grid(tmp, tiny_base, str(inst), str(tmp / "class"))
    spec = yaml.safe_load(Path(grid).read_text())
    spec["overrides"]["trainer.callbacks+"] = {"class_path": "kill_once.KillOnce",
                                               "init_args": {"run": KILLED, "marker": str(tmp / "killed")}}
    Path(grid).write_text(yaml.safe_dump(spec, sort_keys=False))
    summary = ablate(grid, workers=2)
    return grid, tmp / "out", summary


def test_expand_crosses_explicit_cells_with_the_product():
    spec = AblationGrid(base_config=["x.yaml"], out="o", grid={"model.lora.rank": [4, 8]},
                        runs=[Cell({"data.priors.enabled": True}, "prior"),
                              Cell({"data.priors.enabled": False}, "noprior")])
    cells = expand(spec)
    assert [n for n, _ in cells] == ["prior__rank=4", "prior__rank=8", "noprior__rank=4", "noprior__rank=8"]
    assert cells[3][1] == {"data.priors.enabled": False, "model.lora.rank": 8}
    product_only = expand(AblationGrid(["x.yaml"], "o", grid={"a.b": [1], "c.d": [True, None]}))
    assert [n for n, _ in product_only] == ["b=1__d=true", "b=1__d=null"]
    with pytest.raises(SystemExit, match="both named 'same'"):
        expand(AblationGrid(["x.yaml"], "o", runs=[Cell({"a": 1}, "same"), Cell({"a": 2}, "same")]))


def test_bad_grid_files_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_config: [a.yaml]\nout: o\ngrid:\n  model.lora.rank: 4\n")
    with pytest.raises(SystemExit, match=r"bad.yaml.*grid"):
        load_grid(str(bad))
    bad.write_text("out: o\n")
    with pytest.raises(SystemExit, match=r"bad.yaml.*base_config"):
        load_grid(str(bad))
    with pytest.raises(SystemExit, match="does not exist"):
        load_grid(str(tmp_path / "missing.yaml"))
    bad.write_text("base_config: [a.yaml]\nout: o\nruns: [{name: r, overrides: {model.lora_rank: 8}}]\n")
    with pytest.raises(SystemExit, match=r"model.lora_rank moved to model.lora.rank .*grid file '.*bad.yaml'"):
        load_grid(str(bad))  # before any cell's fit, not once per cell
    (tmp_path / "old_base.yaml").write_text("model:\n  cuda_graph: true\n")
    bad.write_text(f"base_config: [{tmp_path / 'old_base.yaml'}]\nout: o\n")
    with pytest.raises(SystemExit, match=r"model.cuda_graph moved to model.perf.cuda_graph .*old_base.yaml"):
        load_grid(str(bad))  # the base configs too
    bad.write_text("base_config: [a.yaml]\nout: o\nevaluation: {token: sks, class_name: dog, samplers: [{scheduler: "
                   "ddmi, steps: 50}]}\n")
    with pytest.raises(SystemExit, match=r"(?s)bad.yaml.*sampler.scheduler 'ddmi' is unknown"):
        ablate(str(bad))  # refused before any fit starts
    bad.write_text("base_config: [a.yaml]\nout: o\nevaluation: {token: sks, class_name: dog, guidance: 7.5}\n")
    with pytest.raises(SystemExit, match=r"evaluation.guidance moved to evaluation.samplers\[i\].guidance .*bad.yaml"):
        load_grid(str(bad))  # the sampler's settings are one type: guidance is each sampler's
    bad.write_text("base_config: [a.yaml]\nout: o\nevaluation: {token: sks, class_name: dog, samplers: "
                   "[{steps: 30}, {steps: 30, guidance: 5.0}]}\n")
    with pytest.raises(SystemExit, match=r"evaluation.samplers lists \['euler-30'\] more than once"):
        ablate(str(bad))


def test_an_evaluation_passes_every_field_to_evaluate_suite_by_name():
    """ablate hands evaluate_suite the Evaluation whole (Evaluation.suite_args): a field evaluate_suite lacks would
    fail every cell's evaluation after its fit, so it fails here."""
    import inspect

    from dreambooth_pl.tools.ablation_grid import Evaluation
    from dreambooth_pl.tools.evaluate import evaluate_suite

    args = Evaluation(token="sks", class_name="dog", seed=3).suite_args()
    params = inspect.signature(evaluate_suite).parameters
    assert set(args) <= set(params) and {"samplers", "instance_dir"}.isdisjoint(args)
    assert (args["token"], args["seed"], args["face_weights"]) == ("sks", 3, "dlib")


def test_shipped_grids_parse_and_expand():
    sizes = {}
    for path in sorted((REPO / "configs/ablations").glob("*.yaml")):
        spec = load_grid(str(path))
        if spec.grid or spec.runs:  # a grid file, not a base fit config
            sizes[path.stem] = len(expand(spec))
            assert spec.evaluation is not None and spec.evaluation.samplers
    assert {"prior", "num_images", "schedulers", "rank", "tiny"} <= set(sizes) and sizes["tiny"] == 4


@pytest.mark.slow
def test_grid_fits_evaluates_and_reports(grid_run):
    _, out, summary = grid_run
    assert "4 cell(s), 0 not done" in summary
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert [(r["data.priors.enabled"], r["data.photos.num_images"]) for r in rows] == [
        ("True", "1"), ("True", "2"), ("False", "1"), ("False", "2")]
    for r in rows:
        for m in METRICS:
            assert -1.0 <= float(r[m]) <= 1.0
        assert Path(r["grid"]).is_file() and r["scheduler"] == "euler" and r["sample_steps"] == "2"
        assert (out / "runs" / r["run"] / "pytorch_lora_weights.safetensors").is_file()
    # no GPUs: a Ray worker takes the next cell with torch imported (jobs.run_jobs' max_calls), evaluation and all
    workers = {json.loads((out / "runs" / r["run"] / STATUS_FILE).read_text())["worker"] for r in rows}
    assert len(workers) < len(rows)
    # each cell trained its own adapter: no two runs produce the same images, so their scores differ
    assert len({r["clip_t"] for r in rows}) > 1
    md = (out / "results.md").read_text()
    assert md.count("<img src=") == 4 and all(r["run"] in md for r in rows)
    for plot in ("plot_data_priors_enabled.png", "plot_data_photos_num_images.png"):
        assert (out / plot).stat().st_size > 1000 and f"({plot})" in md


@pytest.mark.slow
def test_each_cell_equals_the_cell_fitted_alone_and_the_killed_one_resumed(grid_run, tmp_path):
    from dreambooth_pl.cli import DreamBoothCLI
    from dreambooth_pl.runs import RunDir, fit_command

    grid, out, _ = grid_run
    spec = load_grid(grid)
    overrides = {k: v for k, v in spec.overrides.items() if k != "trainer.callbacks+"}  # the killer only kills
    for name, cell in expand(spec):
        alone = RunDir(tmp_path / "alone" / name)
        DreamBoothCLI(args=fit_command(spec.base_config, {**overrides, **cell}, alone))  # `fit`, in this process
        a, b = load_file(out / "runs" / name / "pytorch_lora_weights.safetensors"), load_file(alone.lora)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-equal tensors
    log = (out / "logs" / f"{KILLED}.log").read_text()
    assert "attempt 1: starting at step 0" in log and f"attempt 2: resuming from {out / 'runs' / KILLED}" in log
    assert "checkpoints/last.ckpt at step 1" in log
    assert json.loads((out / "runs" / KILLED / STATUS_FILE).read_text())["attempt"] == 2


@pytest.mark.slow
def test_rerun_of_a_finished_grid_trains_nothing_and_rewrites_the_same_tables(grid_run):
    grid, out, _ = grid_run
    before = statuses(out)
    tables = {p: (out / p).read_bytes() for p in ("results.csv", "results.md")}
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.ckpt")}
    assert "4 cell(s), 0 not done" in ablate(grid, workers=2)
    assert statuses(out) == before and {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    assert {p: (out / p).read_bytes() for p in tables} == tables


@pytest.mark.slow
def test_resume_reruns_only_the_deleted_cell(grid_run):
    grid, out, _ = grid_run
    before = statuses(out)
    evals_before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("ablate_metrics.json")}
    gone = "priors.enabled=false__photos.num_images=1"
    shutil.rmtree(out / "runs" / gone)
    # a run killed after its last checkpoint but before the export: resumed, nothing left to train, exported
    partial = out / "runs" / "priors.enabled=true__photos.num_images=1"
    lora = load_file(partial / "pytorch_lora_weights.safetensors")
    (partial / "pytorch_lora_weights.safetensors").unlink()
    (partial / STATUS_FILE).unlink()
    ablate(grid, workers=2)
    after = statuses(out)
    assert set(after) == set(before)
    assert sorted(n for n in after if after.get(n) != before.get(n)) == [gone, partial.name]
    again = load_file(partial / "pytorch_lora_weights.safetensors")
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)
    evals_after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("ablate_metrics.json")}
    assert {p for p in evals_after if evals_before.get(p) != evals_after[p]} == {
        out / "runs" / gone / "eval" / "euler-2" / "ablate_metrics.json"}
    assert len(read_csv(out / "results.csv")) == 4


@pytest.mark.slow
def test_failing_cell_is_recorded_and_the_grid_goes_on(grid_run, tmp_path):
    """... and a cell of another adapter kind (LoKr, through the LyCORIS package) fits and is evaluated: every kind's
    verbs are test_adapter_verbs.py's, plain LoRA cells are the module's grid (each cell is two processes)."""
    grid, out, _ = grid_run
    spec = yaml.safe_load(Path(grid).read_text())
    spec.update(out=str(tmp_path / "out"), grid={},
                runs=[{"name": "bad", "overrides": {"model.lora.rank": 0}},
                      {"name": "ok", "overrides": {"trainer.max_steps": 1, "model.lora.adapter": "lokr"}}])
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    summary = ablate(str(tmp_path / "g.yaml"), workers=2)
    rows = {r["run"]: r for r in read_csv(tmp_path / "out" / "results.csv")}
    log = tmp_path / "out" / "logs" / "bad.log"
    assert "1 not done ['bad']" in summary
    assert rows["bad"]["status"] == "failed" and "model.lora.rank must be > 0" in rows["bad"]["error"]
    assert rows["bad"]["error"].startswith("exit code 1: error: ") and f"(log: {log})" in rows["bad"]["error"]
    assert rows["ok"]["status"] == "done" and not rows["ok"]["error"] and rows["ok"]["model.lora.adapter"] == "lokr"
    assert all(-1.0 <= float(rows["ok"][m]) <= 1.0 for m in METRICS)  # its LoKr file read by the evaluation
    md = (tmp_path / "out" / "results.md").read_text()
    assert "model.lora.rank must be > 0" in md and "lokr" in md
    assert "model.lora.rank must be > 0" in log.read_text()


@pytest.mark.slow
def test_checkpoint_curve_evaluates_each_saved_step(grid_run, tmp_path):
    from dreambooth_pl.tools.ablate import evaluate_run
    from dreambooth_pl.sampling import SamplerSettings
    from dreambooth_pl.tools.ablation_grid import Evaluation
    from dreambooth_pl.tools.checkpoint_curve import ablate_checkpoints

    _, out, _ = grid_run
    run = out / "runs" / "priors.enabled=true__photos.num_images=2"
    ev = Evaluation(token="sks", class_name="dog", num_prompts=1, images_per_prompt=1,
                    samplers=[SamplerSettings("euler", 2)], resolution=32, clip_weights=None, dino_weights=None)
    ablate_checkpoints(str(run), ev)
    rows = read_csv(run / "curve" / "curve.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    # the step-2 checkpoint is the finished run: its adapters, hence its scores, equal the final LoRA's, scored in
    # this process (random-weight embedders differ per process: the grid scored this cell in its Ray worker)
    final = evaluate_run(run, run / "pytorch_lora_weights.safetensors", ev, tmp_path)[0]
    assert float(rows[1]["clip_t"]) == pytest.approx(final["clip_t"], abs=1e-5)
    assert rows[0]["clip_t"] != rows[1]["clip_t"]
    assert (run / "curve" / "plot_step.png").is_file()
    with pytest.raises(SystemExit, match="multiple of 7"):
        ablate_checkpoints(str(run), ev, every=7)


def test_report_plots_bool_axis_as_bars_and_numbers_as_lines(tmp_path):
    rows = [{"run": f"r{i}", "status": "done", "prior": p, "steps": s, "clip_i": 0.1 * i, "dino": 0.05 * i}
            for i, (p, s) in enumerate([(True, 100), (True, 200), (False, 100), (False, 200)])]
    rows.append({"run": "broken", "status": "failed", "prior": True, "steps": 400, "error": "OOM"})
    paths = write_report(rows, tmp_path, ["prior", "steps"], title="T")
    assert [p.name for p in paths["plots"]] == ["plot_prior.png", "plot_steps.png"]
    header = next(csv.reader(open(paths["csv"])))
    assert header[:6] == ["run", "status", "prior", "steps", "clip_i", "dino"]
    assert "| broken | failed | True | 400 |  |  | OOM |" in paths["md"].read_text()


def test_num_instance_images_takes_the_first_photos(tmp_path):
    from conftest import write_images

    from dreambooth_pl.data.datamodule import DreamBoothDataModule
    from dreambooth_pl.data.images import ImageIntakeError
    from dreambooth_pl.data.settings import PhotoSettings, PriorSettings

    paths = write_images(tmp_path / "inst", 3)

    def dm(num):
        return DreamBoothDataModule(PhotoSettings(str(tmp_path / "inst"), "a sks dog", num), PriorSettings(False),
                                    resolution=32)

    first = dm(2)
    first.setup()
    assert list(first.instance.paths) == paths[:2]
    with pytest.raises(ImageIntakeError, match="has 3 image.*data.photos.num_images is 4"):
        dm(4).setup()
    with pytest.raises(ValueError, match="data.photos.num_images must be >= 1"):
        dm(0)


def test_report_puts_face_identity_beside_clip_and_dino(tmp_path):
    rows = [{"run": f"r{i}", "status": "done", "prior": p, "pixel_dist": 0.3, "dino": 0.4, "face_none": i,
             "face_sim": 0.5, "face_match": 0.25 * i, "clip_i": 0.6} for i, p in enumerate([True, False])]
    header = next(csv.reader(open(write_report(rows, tmp_path, ["prior"], title="T")["csv"])))
    assert header[:9] == ["run", "status", "prior", "clip_i", "dino", "face_sim", "face_match", "face_none",
                          "pixel_dist"]
    assert load_grid(str(REPO / "configs/ablations/tiny.yaml")).evaluation.face_weights == "dlib"


def test_the_markdown_table_shows_a_small_learning_rate_as_set(tmp_path):
    """A grid of learning rates 1e-4 / 5e-5 read 0.0001 in both rows with four decimals (a GPU grid's results.md)."""
    rows = [{"run": f"lr{lr}", "status": "done", "model.optim.learning_rate": lr, "clip_i": 0.812345}
            for lr in (1.0e-4, 5.0e-5)]
    md = write_report(rows, tmp_path, ["model.optim.learning_rate"], title="T")["md"].read_text()
    assert "| lr0.0001 | done | 0.0001 | 0.8123 |" in md and "| lr5e-05 | done | 5e-05 | 0.8123 |" in md
