"""Pipeline model parallelism: profiling, partitioning, schedules, execution."""

# --- profiling, cost model and partitioning ---
from tf_smdist.pipeline.partition import Partition, partition  # noqa: F401
from tf_smdist.pipeline.profiler import (  # noqa: F401
    Profile,
    ProfilingCallback,
    profile_model,
)
from tf_smdist.pipeline.solver import solve_partition  # noqa: F401

# --- schedules and execution ---
# isort: split
from tf_smdist.pipeline.model import PipelineModel  # noqa: F401
from tf_smdist.pipeline.plot import (  # noqa: F401
    Timeline,
    plot_schedule,
    trace_timeline,
)
from tf_smdist.pipeline.schedule import (  # noqa: F401
    Schedule,
    Task,
    gpipe,
    interleaved_1f1b,
    make_schedule,
    one_f_one_b,
)
