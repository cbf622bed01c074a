"""Data parallelism with host-offloaded gradient aggregation.

Names are imported on first use, so the pure bucket planner (`buckets`)
imports without TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "Bucket": "tf_smdist.data_parallel.buckets",
    "BucketPlan": "tf_smdist.data_parallel.buckets",
    "plan_buckets": "tf_smdist.data_parallel.buckets",
    "HostReduceCrossDeviceOps": "tf_smdist.data_parallel.cross_device_ops",
    "DataParallelStrategy": "tf_smdist.data_parallel.strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
