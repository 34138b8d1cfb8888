"""prefetch.py: which files are read ahead, in which order, that they are read whole, and which verbs do it."""
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from dreambooth_pl import prefetch
from dreambooth_pl.__main__ import main


def _touch(path: Path, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """A site-packages with torch's, two nvidia wheels' and Triton's libraries, and ones a fit never runs."""
    site = tmp_path / "site"
    torch_cuda = _touch(site / "torch/lib/libtorch_cuda.so", 64)
    _touch(site / "torch/lib/libtorch_cpu.so")  # mapped by any torch import: not this module's business
    cudnn = _touch(site / "nvidia/cudnn/lib/libcudnn_ops.so.9", 32)
    (site / "nvidia/cudnn/lib/libcudnn_ops.so").symlink_to("libcudnn_ops.so.9")  # the same file twice
    cublas = _touch(site / "nvidia/cu13/lib/libcublasLt.so.13")
    _touch(site / "nvidia/cu13/lib/libcufft.so.12")  # never run by a one-GPU fit
    _touch(site / "nvidia/cu13/lib/libnvrtc.alt.so.13")  # NVRTC's twin for other hosts
    triton = _touch(site / "triton/_C/libtriton.so")
    _touch(site / "triton/_C/libproton.so")  # the profiler's
    dirs = {"torch": [site / "torch"], "nvidia": [site / "nvidia"], "triton": [site / "triton"]}
    monkeypatch.setattr(prefetch, "_package_dirs", lambda name: dirs.get(name, []))
    return [torch_cuda, cudnn, cublas, triton]


def test_the_libraries_a_fit_runs_in_the_order_it_needs_them(wheels):
    assert prefetch.cuda_libraries() == wheels


def test_advise_counts_the_bytes_of_the_files_it_could_open(wheels, tmp_path):
    files = prefetch.cuda_libraries() + [tmp_path / "missing.so"]
    assert prefetch.advise(files, os.POSIX_FADV_WILLNEED) == 64 + 32 + 16 + 16


def test_start_reads_ahead_on_a_thread_unless_turned_off(wheels, monkeypatch):
    monkeypatch.setattr(prefetch, "available_gib", lambda: 100.0)
    thread = prefetch.start()
    assert thread is not None and thread.daemon
    thread.join(10)
    assert not thread.is_alive()
    monkeypatch.setenv(prefetch.ENV, "0")
    assert prefetch.start() is None


def test_a_small_machine_reads_nothing_ahead(wheels, monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       12582912 kB\nMemAvailable:   10485760 kB\n")  # a 12 GB VM: 10 GiB free
    none = str(tmp_path / "no-cgroup")
    assert prefetch.available_gib(str(meminfo), proc_cgroup=none) == 10.0
    assert prefetch.available_gib(str(tmp_path / "none")) is None
    # cgroup v2 without a namespace (a Slurm step, a systemd scope): the 8 GiB limit, 6 used, sits on an ancestor
    v2 = tmp_path / "v2"
    step = v2 / "system.slice/job_7/step_0"
    step.mkdir(parents=True)
    (step.parent / "memory.max").write_text(f"{8 << 30}\n")
    (step.parent / "memory.current").write_text(f"{6 << 30}\n")
    (step / "memory.max").write_text("max\n")
    (step / "memory.current").write_text(f"{1 << 30}\n")
    (tmp_path / "cg2").write_text("0::/system.slice/job_7/step_0\n")
    assert prefetch.available_gib(str(meminfo), str(v2), str(tmp_path / "cg2")) == 2.0
    # cgroup v1, in a container's namespace (the mount's root is this process's group): 12 GiB, 9 used
    v1 = tmp_path / "v1/memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{12 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{9 << 30}\n")
    (tmp_path / "cg1").write_text("5:memory:/docker/abc\n0::/\n")
    assert prefetch.available_gib(str(meminfo), str(tmp_path / "v1"), str(tmp_path / "cg1")) == 3.0
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert prefetch.available_gib(str(meminfo), str(tmp_path / "v1"), str(tmp_path / "cg1")) == 10.0
    monkeypatch.setattr(prefetch, "available_gib", lambda: 10.0)
    assert prefetch.start() is None
    monkeypatch.setattr(prefetch, "available_gib", lambda: None)  # unknown: not read either
    assert prefetch.start() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the page cache's calls are Linux's")
def test_willneed_reads_the_whole_file_not_one_readahead_window(tmp_path):
    """One WILLNEED call for a whole file read its first readahead window only (128 KiB .. a few MiB): 64 MiB is
    far beyond any window, so a prefetch that reads one window leaves it < 20 % resident."""
    path = tmp_path / "libbig.so"
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())  # clean pages, which DONTNEED drops
    prefetch.advise([path], os.POSIX_FADV_DONTNEED)
    if prefetch.resident([path]) > 0.05:
        pytest.skip("this filesystem keeps the file's pages (tmpfs): nothing to read ahead")
    prefetch.advise([path], os.POSIX_FADV_WILLNEED)
    deadline = time.monotonic() + 30  # the reads are asynchronous: a slow CI disk gets time to finish them
    while prefetch.resident([path]) < 0.95 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert prefetch.resident([path]) >= 0.95


def test_an_error_in_the_thread_prints_nothing(wheels, monkeypatch):
    """A hint that cannot be taken (a folder it may not list) is dropped, not printed as a thread's traceback."""
    monkeypatch.setattr(prefetch, "available_gib", lambda: 100.0)
    monkeypatch.setattr(prefetch, "cuda_libraries", lambda: (_ for _ in ()).throw(PermissionError("nvidia/")))
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    prefetch.start().join(10)
    assert raised == []


def test_a_cpu_build_of_torch_starts_nothing(monkeypatch):
    monkeypatch.setattr(prefetch, "_package_dirs", lambda name: [])
    assert prefetch.start() is None


@pytest.mark.parametrize("verb, reads", [("make-base", True), ("benchmark", False), ("fit-many", False)])
def test_which_verbs_read_ahead(verb, reads, monkeypatch):
    started = []
    monkeypatch.setattr(prefetch, "start", lambda: started.append(True))
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert bool(started) is reads
