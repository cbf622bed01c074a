"""Data parallelism with host-offloaded gradient aggregation."""

from tf_smdist.data_parallel.buckets import Bucket, BucketPlan, plan_buckets
from tf_smdist.data_parallel.cross_device_ops import HostReduceCrossDeviceOps
from tf_smdist.data_parallel.strategy import DataParallelStrategy

__all__ = [
    "Bucket",
    "BucketPlan",
    "DataParallelStrategy",
    "HostReduceCrossDeviceOps",
    "plan_buckets",
]
