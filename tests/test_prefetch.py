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
    assert prefetch.available_gib(str(meminfo), cgroup=str(tmp_path / "no-cgroup")) == 10.0
    assert prefetch.available_gib(str(tmp_path / "none")) is None
    cgroup = tmp_path / "cgroup"  # a container limited to 8 GiB with 6 GiB in use: its room, not the host's
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{8 << 30}\n")
    (cgroup / "memory.current").write_text(f"{6 << 30}\n")
    assert prefetch.available_gib(str(meminfo), cgroup=str(cgroup)) == 2.0
    (cgroup / "memory.max").write_text("max\n")  # no limit
    assert prefetch.available_gib(str(meminfo), cgroup=str(cgroup)) == 10.0
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
