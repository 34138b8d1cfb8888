"""Repack a manylinux wheel without files a device call never uses, so the wheels fit its 64 MiB carry.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ray==2.60.0 -d /tmp/w
    python benchmarks/slim_wheel.py /tmp/w/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl .whl/

What each package loses (the GPU image runs CUDA 13):
- ray 2.60.0 cp312: 75.6 MiB as shipped; without ``ray/jars/`` (30.7 MiB: Ray's Java workers, unused by Python
  jobs), ``*.js.map`` (the dashboard's source maps), the dashboard's web client (our jobs start Ray without the
  dashboard) and the RLlib, Serve and LLM libraries (tools/jobs.py uses Ray core's tasks only). Its small
  dependencies the GPU image lacks (jsonschema, jsonschema-specifications, referencing, rpds-py) go in the same
  folder, from constraints.txt.
- bitsandbytes 0.50.2: 41.1 MiB as shipped, 12.8 MiB slim; it loads the one ``libbitsandbytes_cuda<NNN>.so`` matching torch's CUDA,
  so the CUDA 11.8-12.8 builds (~128 MiB unpacked) go and the CUDA 13 ones and the CPU one stay.
The RECORD drops the removed files, so ``pip install --no-deps`` (benchmarks/gpu.sh's .whl/ step) installs it;
checked on Ray's cp311 build: a local Ray starts and runs a task.
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

DROPPED = {
    "ray": re.compile(r"ray/(jars|rllib|llm|serve|dashboard/client)/|.*\.js\.map$"),
    "bitsandbytes": re.compile(r"bitsandbytes/libbitsandbytes_cuda1[12]\d\.so$"),
}


def strip(src: str, out_dir: str) -> Path:
    """Write ``src`` without the files its package's pattern in ``DROPPED`` matches into ``out_dir``."""
    package = Path(src).name.split("-")[0]
    if package not in DROPPED:
        raise SystemExit(f"slim_wheel: no pattern for {package!r} (known: {', '.join(DROPPED)})")
    pattern = DROPPED[package]
    dst = Path(out_dir) / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.resolve() == Path(src).resolve():
        raise SystemExit("slim_wheel: download the wheel to another folder first; it is rewritten into out_dir")
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            if pattern.match(info.filename):
                continue
            data = z.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in data.split(b"\n") if r.strip() and not pattern.match(r.split(b",")[0].decode())]
                data = b"\n".join(rows) + b"\n"
            out.writestr(info, data)
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB (from {Path(src).stat().st_size / 2**20:.1f})")
    return dst


if __name__ == "__main__":
    strip(sys.argv[1], sys.argv[2])
