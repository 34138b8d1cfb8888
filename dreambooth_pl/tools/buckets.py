"""``python -m dreambooth_pl buckets CONFIG...``: the aspect-bucket table a fit config trains with, and how many of
its instance photos fall in each bucket, before any model loads.

``fit --print_config`` cannot show the table: it is derived from ``data.resolution``, ``data.bucket_step`` and
``data.bucket_max_ratio``, and jsonargparse dumps only the values it parses. Fit logs the same table when it starts.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional


def buckets(configs: list[str], resolution: Optional[int] = None, bucket_step: Optional[int] = None,
            bucket_max_ratio: Optional[float] = None) -> str:
    """The bucket table of ``fit --config C1 --config C2 ...``, with each bucket's count of ``data.instance_dir``'s
    photos (read and checked as fit reads them), as fit logs it.

    Args:
        configs: fit config files, later ones overriding earlier ones (read with fit's own parser).
        resolution: try another ``data.resolution`` (None: the config's).
        bucket_step: try another ``data.bucket_step`` (None: the config's).
        bucket_max_ratio: try another ``data.bucket_max_ratio`` (None: the config's).
    """
    from ..cli import read_fit_config
    from ..data.buckets import bucket_photos, bucket_table, describe, table_header
    from ..data.datamodule import find_instance_images

    missing = [c for c in configs if not Path(c).is_file()]
    if not configs or missing:
        found = f"not found: {', '.join(missing)}" if missing else "none given"
        raise ValueError(f"buckets reads fit config files ({found}), e.g. python -m dreambooth_pl buckets "
                         "configs/smoke.yaml")
    with warnings.catch_warnings():  # LightningCLI warns that args= and sys.argv are both set: here by design
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        data = read_fit_config(*configs, partial=True).get("data") or {}
    given = {"resolution": resolution, "bucket_step": bucket_step, "bucket_max_ratio": bucket_max_ratio}
    data.update({k: v for k, v in given.items() if v is not None})
    res, step, ratio = data["resolution"], data["bucket_step"], data["bucket_max_ratio"]
    note = "" if data.get("aspect_buckets") else (
        f"data.aspect_buckets is off in this config: fit trains square {res}x{res} crops. With "
        "data.aspect_buckets: true it would use:\n")
    if not data.get("instance_dir"):  # a config without the subject: the table alone
        return note + table_header(res) + describe(bucket_table(res, step, ratio), None)
    photos = find_instance_images(data["instance_dir"], data.get("num_instance_images"), res,
                                  data.get("strict_images", True))
    return note + bucket_photos(photos, res, step, ratio)[1]
