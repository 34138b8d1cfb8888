"""``python -m dreambooth_pl buckets CONFIG...``: the aspect-bucket table a fit config trains with, and how many of
its instance photos fall in each bucket, before any model loads.

``fit --print_config`` (and each run's config.yaml) ends with the same table as comments, and fit logs it when it
starts; this command also tries other resolutions and steps without a fit.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional


def buckets(configs: list[str], resolution: Optional[int] = None, bucket_step: Optional[int] = None,
            bucket_max_ratio: Optional[float] = None) -> str:
    """The bucket table of ``fit --config C1 --config C2 ...``, with each bucket's count of ``data.photos.dir``'s
    photos (read and checked as fit reads them), as fit logs it.

    Args:
        configs: fit config files, later ones overriding earlier ones (read with fit's own parser).
        resolution: try another ``data.resolution`` (None: the config's).
        bucket_step: try another ``data.crops.bucket_step`` (None: the config's).
        bucket_max_ratio: try another ``data.crops.bucket_max_ratio`` (None: the config's).
    """
    from ..cli import read_fit_config
    from ..data.buckets import bucket_report

    missing = [c for c in configs if not Path(c).is_file()]
    if not configs or missing:
        found = f"not found: {', '.join(missing)}" if missing else "none given"
        raise ValueError(f"buckets reads fit config files ({found}), e.g. python -m dreambooth_pl buckets "
                         "configs/smoke.yaml")
    with warnings.catch_warnings():  # LightningCLI warns that args= and sys.argv are both set: here by design
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        data = read_fit_config(*configs, partial=True).get("data") or {}
    if resolution is not None:
        data["resolution"] = resolution
    given = {"bucket_step": bucket_step, "bucket_max_ratio": bucket_max_ratio}
    data["crops"] = {**(data.get("crops") or {}), **{k: v for k, v in given.items() if v is not None}}
    return bucket_report(data)
