"""Shared fixtures: a seeded tiny SDXL-layout base built once per session, sample images, a tiny fit config."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "dog"


def interpreted(monkeypatch, module: str):
    """``dreambooth_pl.<module>`` (a Triton kernel file) imported afresh under Triton's interpreter
    (``TRITON_INTERPRET=1``: its kernels run on CPU tensors), in place of the package's own for one test."""
    import importlib.util
    import sys

    pytest.importorskip("triton")
    import dreambooth_pl

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name = f"dreambooth_pl.{module}"
    spec = importlib.util.spec_from_file_location(name, REPO / "dreambooth_pl" / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(dreambooth_pl, module, mod, raising=False)
    return mod


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A random tiny SDXL pipeline folder (the real layout and tokenizers), shared by the whole session."""
    from dreambooth_pl.bases import make_base

    return make_base("tiny", str(tmp_path_factory.mktemp("bases") / "tiny-sdxl"), seed=0)


@pytest.fixture(scope="session", autouse=True)
def prior_cache_in_tmp(tmp_path_factory):
    """The shared class-prior cache (data/prior_cache.py) and the GPU's default latent store
    (``data.latent_cache: auto``, data/latent_store.py) in this session's temporary folder, not the home's: a GPU
    test's peak or encode count must not depend on what an earlier session stored."""
    from dreambooth_pl.data import latent_store, prior_cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prior_cache, "PRIOR_CACHE", str(tmp_path_factory.mktemp("prior-cache")))
        mp.setattr(latent_store, "LATENT_CACHE", str(tmp_path_factory.mktemp("latent-cache")))
        yield


@pytest.fixture(autouse=True)
def no_base_left_behind():
    """A test that drew class priors in-process and never loaded the base again leaves the next test nothing."""
    yield
    from dreambooth_pl import base_handoff

    base_handoff.release()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on one intra-op thread: thread start-up and spinning cost more than they save at this size
    (measured: a tiny fit is ~15% faster alone, several times faster when cores are shared)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (README's test command): one worker per core, at most 4. Each worker imports torch and builds its
    own tiny base (~1.5 GB), and several tests start subprocesses (Ray's 2 workers, 2-process DDP) of their own."""
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4))


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu``-marked tests where CUDA is absent, so running one test file on a CPU machine just works."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run it through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_embedders():
    """(CLIP ViT-B/32, DINO ViT-S/16) of the metrics with seeded random weights: the real architectures offline."""
    import torch

    from dreambooth_pl.metrics import load_clip, load_dino

    torch.manual_seed(0)
    return load_clip(None), load_dino(None)


@pytest.fixture(scope="session")
def clip(random_embedders):
    """The random-weight CLIP ViT-B/32 embedder."""
    return random_embedders[0]


@pytest.fixture(scope="session")
def dino(random_embedders):
    """The random-weight DINO ViT-S/16 embedder."""
    return random_embedders[1]


def write_images(folder: Path, n: int, size=(80, 64), seed: int = 0, ext: str = "png") -> list[Path]:
    """``n`` random RGB images of ``size`` (w, h) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.{ext}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base gets loaded: bad input must be reported before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the bad input was reported")

    monkeypatch.setattr("dreambooth_pl.model_setup.load_parts", refuse)
    monkeypatch.setattr("dreambooth_pl.sdxl.load_parts", refuse)


def make_subject_dirs(root: Path, n_class: int = 4) -> tuple[str, str]:
    """(``root/instance`` with 2 sample dog photos, ``root/class`` with ``n_class`` random images)."""
    inst = root / "instance"
    inst.mkdir()
    for p in sorted(SAMPLE.glob("*.jpg"))[:2]:
        shutil.copy(p, inst / p.name)
    write_images(root / "class", n_class)
    return str(inst), str(root / "class")


@pytest.fixture
def subject_dirs(tmp_path) -> tuple[str, str]:
    """(instance dir with 2 sample dog photos, class dir with 4 random images)."""
    return make_subject_dirs(tmp_path)


# Every line a fit may print (full-line regexes): tests/test_console.py on the CPU, the recipe's console on the GPU
# (test_gpu_acceptance.py). A new line fails them until it is filtered (console.py) or allowed here on purpose.
CONSOLE_ALLOWED = [
    r"Seed set to \d+", r"(GPU|TPU|HPU) available: .*", r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES: .*",
    r"Using (16bit|bfloat16) Automatic Mixed Precision \(AMP\)",
    r"aspect buckets \(height x width, ~\d+² pixels\):", r"  \d+x\d+ \(\d\.\d\d\): \d+ image\(s\)",
    r"  \(\d+ other bucket\(s\) hold no photo\)",
    r".*RandomBaseWarning: base '.*' has RANDOM weights .*", r"  root = resolve_base\(base\)",  # ours, on purpose
    r"class images -> .*", r"parameters: [\d.]+ [KMB] trainable \([\d.]+ MiB of adapters\), [\d.]+ [KMB] frozen",
    r"step \d+/\d+ .*", r"LoRA written to .*", r"fit finished: step .*", r"  peak GPU memory: .*",
    r"  (LoRA|checkpoint|TensorBoard|resume|sample|phases): .*", r"memory plan: .*",
    # ours, on purpose: what loading did to the user's photos (the sample dog's 256 px photos at 1024 px), once
    r".*UserWarning: instance images adjusted on load:", r"  return check_images\(.*\)",
    r"  \S.*: (upscaled: |rotated upright |converted |MPO camera photo |animated \().*",
    r"token embeddings written to .*",  # model.pivotal's *_emb.safetensors beside the LoRA
]


def console_lines(text: str) -> list[str]:
    """The non-empty lines of captured console text (progress-bar redraws split on carriage returns)."""
    import re

    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


def fit_console(args: list[str], timeout: int) -> list[str]:
    """Run ``python -m dreambooth_pl`` with ``args`` as its own process (the console, and how Lightning sets up
    its log handlers there, is the point) and return its lines, after asserting it exited 0, printed only
    :data:`CONSOLE_ALLOWED` lines and one bucket table."""
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_PL_SHOW_ALL_WARNINGS"}
    run = subprocess.run([sys.executable, "-m", "dreambooth_pl", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    lines = console_lines(run.stdout + run.stderr)
    assert run.returncode == 0, "\n".join(lines[-40:])
    unexpected = [ln for ln in lines if not any(re.fullmatch(p, ln) for p in CONSOLE_ALLOWED)]
    assert not unexpected, "unexpected console lines:\n" + "\n".join(unexpected)
    assert sum(ln.startswith("aspect buckets") for ln in lines) == 1, "\n".join(lines)
    return lines


def fit_args(base: str, instance_dir: str, class_dir: str | None, root: str, steps: int = 2, **over) -> list[str]:
    """Command-line arguments of a tiny CPU fit (used in-process through LightningCLI's ``args``)."""
    from dreambooth_pl.runs import fit_command

    settings = {"seed_everything": 0, "trainer.accelerator": "cpu", "trainer.devices": 1,
                "trainer.precision": "32-true", "trainer.max_steps": steps, "trainer.log_every_n_steps": 1,
                "trainer.enable_progress_bar": "false", "trainer.enable_model_summary": "false",
                "trainer.logger.init_args.save_dir": root, "model.base_model": base, "model.lora.init": "false",
                "data.photos.dir": instance_dir, "data.photos.prompt": "a photo of sks dog",
                "data.resolution": 32, "checkpoint.every_n_train_steps": 1}
    if class_dir:
        settings.update({"data.priors.dir": class_dir, "data.priors.prompt": "a photo of dog",
                         "data.priors.num_images": 4})
    else:
        settings["data.priors.enabled"] = "false"
    return fit_command(overrides={**settings, **over})  # the builder ablate uses too


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After a GPU run (``-m gpu`` on a CUDA machine), append date, GPU and result to docs/gpu-tests.md (and to
    $OUT/gpu-tests-row.md, which the device tool brings back)."""
    import datetime

    import torch

    if not torch.cuda.is_available() or "gpu" not in (config.option.markexpr or ""):
        return
    counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
    import diffusers
    import lightning

    row = (f"| {datetime.date.today()} | {torch.cuda.get_device_name()} x{torch.cuda.device_count()} | "
           f"torch {torch.__version__}, lightning {lightning.__version__}, diffusers {diffusers.__version__} | "
           f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
           f"{counts['skipped']} skipped | `pytest -m gpu` |\n")
    for path in filter(None, [REPO / "docs" / "gpu-tests.md",
                              os.environ.get("OUT") and Path(os.environ["OUT"]) / "gpu-tests-row.md"]):
        with open(path, "a") as f:
            f.write(row)


def face_photos() -> dict:
    """Public-domain faces that installed packages ship: scikit-image's ``astronaut`` (Eileen Collins, NASA) and
    matplotlib's ``grace_hopper.jpg`` (US Navy), as RGB PIL images."""
    import matplotlib
    from skimage import data

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as im:
        return {"astronaut": Image.fromarray(data.astronaut()), "hopper": im.convert("RGB")}


KILL_ONCE = '''
import os, signal
import lightning as L


class KillOnce(L.Callback):
    """SIGKILL this fit process when run folder ``run`` starts step ``at_step`` (after that step's last.ckpt),
    once: the marker file makes the retried fit run on."""

    def __init__(self, run: str, marker: str, at_step: int = 1):
        self.run, self.marker, self.at_step = run, marker, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step and os.path.basename(trainer.log_dir) == self.run \\
                and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray (2 CPUs: two jobs at once) for one test module; the commands join it instead of starting one.
    Its workers see ``kill_once.KillOnce`` (a test callback, hence DREAMBOOTH_PL_TRUST_CONFIG)."""
    helpers = tmp_path_factory.mktemp("helpers")
    (helpers / "kill_once.py").write_text(KILL_ONCE)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "DREAMBOOTH_PL_TRUST_CONFIG")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(helpers), saved["PYTHONPATH"]) if p)
    os.environ["DREAMBOOTH_PL_TRUST_CONFIG"] = "1"
    from dreambooth_pl.tools.jobs import ray_session

    try:
        with ray_session(workers=2):
            yield helpers
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
