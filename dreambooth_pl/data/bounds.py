"""Upper and lower bounds of every data setting that sizes a loop or a table, checked when the data module is
built (right after parsing, before any model loads): an absurd value is refused by key within a second, where it
used to hang (``data.crops.bucket_max_ratio: 1e9`` enumerated 2.5e8 bucket widths) or fill a disk.

The upper bounds sit far above any documented recipe (SDXL trains at 1024 px, DreamBooth draws 200 class images);
docs/reliability.md lists them.
"""
from __future__ import annotations

from typing import Optional

# key -> (lowest, highest) accepted value, inclusive
BOUNDS = {
    "resolution": (8, 4096),  # pixels of the training square (SDXL: 1024)
    "crops.bucket_step": (8, 1024),  # bucket side granularity (64 in kohya's scripts)
    "crops.bucket_max_ratio": (1.0, 8.0),  # long/short side of the widest bucket (kohya: 2)
    "batch_size": (1, 1024),
    "num_workers": (0, 256),
    "priors.num_images": (0, 100_000),  # the paper draws 200
    "photos.num_images": (1, 100_000),
    "priors.generation.sampler.steps": (1, 1000),
    "priors.generation.batch_size": (1, 1024),
    "priors.generation.resolution": (8, 4096),
}


def check_bounds(values: dict[str, Optional[float]]) -> None:
    """Refuse, naming every offending ``data.*`` key with its range, values outside :data:`BOUNDS`.

    Args:
        values: key (as in :data:`BOUNDS`) -> value; None (unset) is skipped.
    Raises:
        ValueError: listing each out-of-range key.
    """
    bad = []
    for key, value in values.items():
        lo, hi = BOUNDS[key]
        if value is not None and not lo <= value <= hi:
            bad.append(f"data.{key} must be in [{lo:g}, {hi:g}], got {value:g}")
    if bad:
        raise ValueError("; ".join(bad) + " (docs/reliability.md says why each bound is there).")
