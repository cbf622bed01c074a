"""tf_smdist: distributed training for Keras 3 on TensorFlow.

Data parallelism with host-offloaded gradient aggregation
(`DataParallelStrategy`) and pipeline model parallelism with automatic
partitioning (`PipelineModel`).

Names are imported on first use, so `import tf_smdist` (and the launcher,
`python -m tf_smdist.launch`) does not start TensorFlow by itself.
"""

from __future__ import annotations

import importlib
from typing import Any

from tf_smdist._version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    # devices
    "configure_cpu_devices": "tf_smdist.devices",
    # --- op library -----------------------------------------------------
    "host_reduce": "tf_smdist._ops",
    "pack": "tf_smdist._ops",
    "unpack": "tf_smdist._ops",
    # --- data parallel --------------------------------------------------
    "DataParallelStrategy": "tf_smdist.data_parallel.strategy",
    # --- pipeline parallel ----------------------------------------------
    "Partition": "tf_smdist.pipeline.partition",
    "partition": "tf_smdist.pipeline.partition",
    "Profile": "tf_smdist.pipeline.profile",
    "ProfilingCallback": "tf_smdist.pipeline.callback",
    "profile_model": "tf_smdist.pipeline.profiler",
    "PipelineModel": "tf_smdist.pipeline.model",
    "plot_schedule": "tf_smdist.pipeline.plot",
    # --- layout planning ------------------------------------------------
    "Cluster": "tf_smdist.planner.cluster",
    "plan": "tf_smdist.planner.search",
}
_SUBPACKAGES = ("data_parallel", "pipeline", "planner", "launch", "devices",
                "horovod", "sdp")

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"tf_smdist.{name}")
    else:
        raise AttributeError(f"module 'tf_smdist' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
