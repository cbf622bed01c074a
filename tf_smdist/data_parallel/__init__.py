"""Data parallelism with host-offloaded gradient aggregation.

Names are imported on first use, so the pure bucket planner (`buckets`)
imports without TensorFlow.
"""

from __future__ import annotations

from tf_smdist._lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    "Bucket": "tf_smdist.data_parallel.buckets",
    "BucketPlan": "tf_smdist.data_parallel.buckets",
    "plan_buckets": "tf_smdist.data_parallel.buckets",
    "HostReduceCrossDeviceOps": "tf_smdist.data_parallel.cross_device_ops",
    "DataParallelStrategy": "tf_smdist.data_parallel.strategy",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
