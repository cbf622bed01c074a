"""Layout planning: predict and choose data parallel × pipeline for a cluster.

Pure Python (no TensorFlow at import): `Cluster` describes the hardware,
`plan` searches the layouts of a profiled model on it.
"""

from tf_smdist.planner.cluster import Cluster
from tf_smdist.planner.model import PlanRow
from tf_smdist.planner.search import Plan, plan

__all__ = ["Cluster", "Plan", "PlanRow", "plan"]
