"""tf_smdist: distributed training for Keras 3 on TensorFlow.

Data parallelism with host-offloaded gradient aggregation
(`DataParallelStrategy`) and pipeline model parallelism with automatic
partitioning (`PipelineModel`).

Names are imported on first use, so `import tf_smdist` (and the launcher,
`python -m tf_smdist.launch`) does not start TensorFlow by itself.
"""

from __future__ import annotations


from tf_smdist._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBPACKAGES)
