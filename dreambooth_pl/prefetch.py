"""Read the CUDA libraries' files ahead, on a thread, while the process imports: a fresh machine's first GPU calls.

A GPU process maps cuDNN's, cuBLAS's and libtorch_cuda's shared objects (several GB) and reads each page of them
from disk the first time a kernel there runs: on a machine whose page cache does not hold them yet (a fresh VM,
an image with torch preinstalled) those reads stall the first convolution, GEMM and attention of the prior draw and
of the first training step, one page fault at a time. ``posix_fadvise(POSIX_FADV_WILLNEED)`` asks the kernel to
read a whole file into the page cache ahead (Linux readahead); issued at process start, the reads overlap the ~8 s
of Python imports, which are CPU-bound. Linux reads at most one readahead window per call (``force_page_cache_ra``
in mm/readahead.c caps it at ``max(read_ahead_kb, max_sectors_kb)``: 128 KiB to a few MiB), so each file is advised
in :data:`WILLNEED_CHUNK` steps; one call for the whole file read its first window only. Cached pages cost nothing
to advise again; nothing is read into this process's memory, and the kernel may evict the pages again under memory
pressure (a hint, not a lock).

``DREAMBOOTH_PL_PREFETCH=0`` turns it off (the benchmark's A/B arm: ``benchmarks/gpu.sh cold-ab``).
"""
from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

# the libraries a GPU fit touches, in the order it needs them: torch's CUDA kernels (mapped by ``import torch``);
# by file name under the ``nvidia`` wheels (whose folder layout differs between CUDA 12's and 13's) cuDNN's engines
# (convolutions, attention), cuBLAS(Lt) (GEMMs), NVRTC and nvJitLink (cuDNN's runtime-compiled engines), the
# runtime; then Triton's compiler (the fused kernels' builds). cuFFT, cuSPARSE, cuSOLVER, NCCL are left out: a
# one-GPU fit never runs them
NVIDIA_LIBS = ("libcudnn*.so*", "libcublas*.so*", "libnvrtc.so*", "libnvrtc-builtins.so*", "libnvJitLink*.so*",
               "libcudart*.so*")  # (NVRTC's ``.alt`` twins are for other hosts' code paths)
TORCH_LIBS = ("libtorch_cuda.so*", "libc10_cuda.so*")
ENV = "DREAMBOOTH_PL_PREFETCH"
# read ahead only with this much memory available: on a small machine (a 12 GB Colab VM) 2.6 GiB of libraries could
# push the base's just-downloaded weights out of the page cache, to be read again from a slower disk
MIN_AVAILABLE_GIB = 16.0
# the default readahead window (VM_READAHEAD_PAGES): no device's cap is smaller, so each step is read whole
WILLNEED_CHUNK = 128 << 10


def _package_dirs(name: str) -> list[Path]:
    """The folders of package ``name`` (a namespace package may have several), without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # the parent package is missing (a CPU build of torch)
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []


def cuda_libraries() -> list[Path]:
    """The shared objects worth reading ahead, resolved, in the order given (empty on a CPU-only install)."""
    files: list[Path] = []
    for folder in _package_dirs("torch"):  # first: ``import torch`` maps it at once
        for pattern in TORCH_LIBS:
            files += sorted((folder / "lib").glob(pattern))
    nvidia = _package_dirs("nvidia")
    for pattern in NVIDIA_LIBS:
        for folder in nvidia:
            files += sorted(p for p in folder.rglob(pattern) if p.is_file())
    for folder in _package_dirs("triton"):
        files += sorted((folder / "_C").glob("libtriton*.so*"))
    unique: dict[Path, None] = {}  # a versioned name and its links are one file
    for p in files:
        unique.setdefault(p.resolve())
    return list(unique)


def advise(files: list[Path], advice: int) -> int:
    """``posix_fadvise`` each whole file with ``advice``; the bytes advised (a file that cannot be opened is skipped).

    WILLNEED walks the file in :data:`WILLNEED_CHUNK` steps (one call reads one readahead window); DONTNEED, which
    the kernel applies to the whole range, is one call.

    Args:
        files: the files.
        advice: ``os.POSIX_FADV_WILLNEED`` (read ahead) or ``os.POSIX_FADV_DONTNEED`` (drop clean cached pages:
            the benchmark's way to make a warm machine's page cache cold again).
    """
    total = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            if advice == os.POSIX_FADV_WILLNEED:
                for offset in range(0, size, WILLNEED_CHUNK):
                    os.posix_fadvise(fd, offset, WILLNEED_CHUNK, advice)
            else:
                os.posix_fadvise(fd, 0, 0, advice)
            total += size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def resident(files: list[Path]) -> float:
    """The fraction of the files' bytes in the page cache now (``mincore(2)`` over a read-only mapping of each; Linux
    only): what a read-ahead achieved, for the tests and ``benchmarks/page_cache.py``."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for path in files:
        size = os.path.getsize(path)
        if size == 0:
            continue
        vec = ctypes.create_string_buffer((size + page - 1) // page)
        with open(path, "rb") as f:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            libc.munmap(addr, size)
        cached += sum(b & 1 for b in vec.raw) * page
        total += len(vec.raw) * page
    return cached / total if total else 1.0


def cgroup_room_gib(root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> float | None:
    """The least room (limit less usage) over this process's memory cgroup and its ancestors, where page cache
    counts against a container's or a job's limit: cgroup v2 ``memory.max``/``memory.current``, v1
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``; None without a limit.

    Args:
        root: where the cgroup file systems are mounted.
        proc: this process's cgroup membership (``/proc/self/cgroup``).
    """
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    fields = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    hierarchies = [(Path(root), path, "memory.max", "memory.current") for num, _, path in fields if num == "0"]
    hierarchies += [(Path(root, "memory"), path, "memory.limit_in_bytes", "memory.usage_in_bytes")
                    for _, controllers, path in fields if "memory" in controllers.split(",")]
    room = None
    for base, path, limit_file, usage_file in hierarchies:
        folder = base / path.strip("/")
        if not folder.is_dir():  # inside a container's namespace the mount's root is this process's cgroup
            folder = base
        while True:  # a Slurm step or systemd scope: the limit may sit on an ancestor
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 1 << 62:  # v1 writes "no limit" as 2^63 less a page
                    left = int(limit) - int((folder / usage_file).read_text())
                    room = left if room is None else min(room, left)
            except (OSError, ValueError):
                pass
            if folder == base or folder.parent == folder:
                break
            folder = folder.parent
    return None if room is None else room / 2**30


def available_gib(meminfo: str = "/proc/meminfo", cgroup_root: str = "/sys/fs/cgroup",
                  proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The memory available for new pages, page cache included: Linux's ``MemAvailable``, or less where this
    process's cgroups have less room left (:func:`cgroup_room_gib`); None if unknown.

    Args:
        meminfo: the kernel's memory summary.
        cgroup_root, proc_cgroup: see :func:`cgroup_room_gib`.
    """
    try:
        with open(meminfo) as f:
            gib = next(int(line.split()[1]) / 2**20 for line in f if line.startswith("MemAvailable:"))  # kB
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    room = cgroup_room_gib(cgroup_root, proc_cgroup)
    return gib if room is None else min(gib, room)


def _read_ahead() -> None:
    """The thread's work: a hint that cannot be taken (a folder it may not list, a link loop) is dropped silently
    rather than printed as a thread's traceback into the user's console."""
    try:
        advise(cuda_libraries(), os.POSIX_FADV_WILLNEED)
    except Exception:
        pass


def start() -> threading.Thread | None:
    """Read :func:`cuda_libraries` ahead on a daemon thread (None where the platform has no ``posix_fadvise``, the
    install has no ``nvidia`` wheels, less than :data:`MIN_AVAILABLE_GIB` is available, or
    ``DREAMBOOTH_PL_PREFETCH=0``)."""
    if os.environ.get(ENV, "1") == "0" or not hasattr(os, "posix_fadvise"):
        return None
    if not _package_dirs("nvidia"):  # a CPU build of torch: nothing to read
        return None
    if (available_gib() or 0.0) < MIN_AVAILABLE_GIB:
        return None
    # listing the files walks the wheels' folders, and the advice submits the reads and may block while the device
    # queue is full: a thread keeps the imports going (posix_fadvise releases the GIL)
    thread = threading.Thread(target=_read_ahead, name="prefetch-cuda-libs", daemon=True)
    thread.start()
    return thread
