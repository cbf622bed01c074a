"""Pipeline model parallelism: profiling, partitioning, schedules, execution."""

# --- profiling, cost model and partitioning ---
from tf_smdist.pipeline.solver import solve_partition  # noqa: F401
