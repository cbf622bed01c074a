"""Pipeline model parallelism: profiling, partitioning, schedules, execution."""

# --- profiling, cost model and partitioning ---
from tf_smdist.pipeline.partition import Partition, partition  # noqa: F401
from tf_smdist.pipeline.profiler import (  # noqa: F401
    Profile,
    ProfilingCallback,
    profile_model,
)
from tf_smdist.pipeline.solver import solve_partition  # noqa: F401
