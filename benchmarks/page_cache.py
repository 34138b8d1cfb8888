"""The CUDA libraries' files (dreambooth_pl/prefetch.py) out of the page cache, and how fast this disk reads them back.

    python3 benchmarks/page_cache.py evict     drop their clean cached pages (POSIX_FADV_DONTNEED): a fresh machine's
                                               page cache, for the next process (gpu.sh cold-ab)
    python3 benchmarks/page_cache.py read      evict, read every file through once (cold), again (warm), evict: one
                                               JSON line with the bytes and both times (whether eviction works on
                                               this filesystem, and the disk's rate a fresh machine pays)
    python3 benchmarks/page_cache.py prefetch  evict, then prefetch.advise(WILLNEED) as a fit's thread does: how long
                                               its calls take and when the files are resident (mincore), one JSON line
"""
import json
import os
import sys
import time

from dreambooth_pl.prefetch import advise, cuda_libraries, resident


def read_all(files) -> float:
    """Seconds to read every file once, 16 MiB at a time."""
    t = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
    return time.perf_counter() - t


files = cuda_libraries()
evicted = advise(files, os.POSIX_FADV_DONTNEED)
if sys.argv[1:] == ["read"]:
    cold = read_all(files)
    warm = read_all(files)
    advise(files, os.POSIX_FADV_DONTNEED)
    gib = evicted / 2**30
    print(json.dumps({"files": len(files), "gib": round(gib, 3), "cold_s": round(cold, 3), "warm_s": round(warm, 3),
                      "cold_gib_per_s": round(gib / cold, 2), "warm_gib_per_s": round(gib / warm, 2),
                      "largest": sorted((os.path.getsize(p) >> 20, p.name) for p in files)[-4:]}))
elif sys.argv[1:] == ["prefetch"]:
    after_evict = resident(files)
    t = time.perf_counter()
    advise(files, os.POSIX_FADV_WILLNEED)
    calls = time.perf_counter() - t
    seen = resident(files)
    while seen < 0.99 and time.perf_counter() - t < 60:
        time.sleep(0.1)
        seen = resident(files)
    done = time.perf_counter() - t
    advise(files, os.POSIX_FADV_DONTNEED)
    print(json.dumps({"files": len(files), "gib": round(evicted / 2**30, 3), "resident_after_evict": round(after_evict, 3),
                      "advise_calls_s": round(calls, 3), "resident": round(seen, 3), "resident_after_s": round(done, 3),
                      "gib_per_s": round(evicted / 2**30 / done, 2)}))
else:
    print(f"evicted {len(files)} files, {evicted / 2**30:.2f} GiB")
