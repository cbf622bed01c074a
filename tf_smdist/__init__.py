"""tf_smdist: distributed training for Keras 3 on TensorFlow.

Data parallelism with host-offloaded gradient aggregation
(`DataParallelStrategy`) and pipeline model parallelism with automatic
partitioning (`PipelineModel`).
"""

from tf_smdist._version import __version__
from tf_smdist.devices import configure_cpu_devices

# --- op library ---------------------------------------------------------
from tf_smdist._ops import host_reduce, pack, unpack

# --- data parallel ------------------------------------------------------
from tf_smdist.data_parallel.strategy import DataParallelStrategy

# --- pipeline parallel --------------------------------------------------
from tf_smdist.pipeline.partition import Partition, partition
from tf_smdist.pipeline.profiler import Profile, ProfilingCallback, profile_model
from tf_smdist.pipeline.model import PipelineModel
from tf_smdist.pipeline.plot import plot_schedule

__all__ = [
    "DataParallelStrategy",
    "Partition",
    "PipelineModel",
    "Profile",
    "ProfilingCallback",
    "__version__",
    "configure_cpu_devices",
    "host_reduce",
    "pack",
    "partition",
    "plot_schedule",
    "profile_model",
    "unpack",
]
