"""Pipeline model parallelism: profiling, partitioning, schedules, execution.

Names are imported on first use, so the pure planning modules
(`schedule`, `solver`, `cost_model`, `partition`, `profile`) import without
TensorFlow or Keras.
"""

from __future__ import annotations

from tf_smdist._lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    # --- profiling, cost model and partitioning (pure, but `profile_model`
    # and `ProfilingCallback`) ---
    "LayerProfile": "tf_smdist.pipeline.profile",
    "Profile": "tf_smdist.pipeline.profile",
    "Partition": "tf_smdist.pipeline.partition",
    "partition": "tf_smdist.pipeline.partition",
    "solve_partition": "tf_smdist.pipeline.solver",
    "profile_model": "tf_smdist.pipeline.profiler",
    "ProfilingCallback": "tf_smdist.pipeline.callback",
    # --- schedules (pure) ---
    "Schedule": "tf_smdist.pipeline.schedule",
    "Task": "tf_smdist.pipeline.schedule",
    "gpipe": "tf_smdist.pipeline.schedule",
    "interleaved_1f1b": "tf_smdist.pipeline.schedule",
    "make_schedule": "tf_smdist.pipeline.schedule",
    "one_f_one_b": "tf_smdist.pipeline.schedule",
    # --- execution ---
    "PipelineModel": "tf_smdist.pipeline.model",
    "Timeline": "tf_smdist.pipeline.plot",
    "plot_schedule": "tf_smdist.pipeline.plot",
    "trace_timeline": "tf_smdist.pipeline.plot",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
