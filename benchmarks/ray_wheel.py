"""Repack Ray's manylinux wheel without its Java jar and JS source maps, so it fits a device call (64 MiB carry).

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ray==2.60.0 -d /tmp/w
    python benchmarks/ray_wheel.py /tmp/w/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl .whl/

ray 2.60.0 cp312: 75.6 MiB as shipped, 43.4 MiB without ``ray/jars/`` (30.7 MiB: Ray's Java workers, unused by
Python jobs) and ``*.js.map`` (the dashboard's source maps). The RECORD drops the removed files, so
``pip install --no-deps`` (benchmarks/gpu.sh's .whl/ step) installs it; checked on the cp311 build: a local Ray
starts and runs a task. Its small dependencies (msgpack, jsonschema, jsonschema-specifications, referencing,
rpds-py) go in .whl/ too, from constraints.txt.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def dropped(name: str) -> bool:
    return name.startswith("ray/jars/") or name.endswith(".js.map")


def strip(src: str, out_dir: str) -> Path:
    dst = Path(out_dir) / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            if dropped(info.filename):
                continue
            data = z.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in data.split(b"\n") if r.strip() and not dropped(r.split(b",")[0].decode())]
                data = b"\n".join(rows) + b"\n"
            out.writestr(info, data)
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB (from {Path(src).stat().st_size / 2**20:.1f})")
    return dst


if __name__ == "__main__":
    strip(sys.argv[1], sys.argv[2])
