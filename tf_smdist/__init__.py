"""tf_smdist: distributed training for Keras 3 on TensorFlow.

Data parallelism with host-offloaded gradient aggregation
partitioning (`PipelineModel`).
"""

from tf_smdist._version import __version__
from tf_smdist.devices import configure_cpu_devices

# --- op library ---------------------------------------------------------
from tf_smdist._ops import host_reduce, pack, unpack

# --- data parallel ------------------------------------------------------

# --- pipeline parallel --------------------------------------------------

__all__ = [
    "__version__",
    "configure_cpu_devices",
    "host_reduce",
    "pack",
    "unpack",
]
