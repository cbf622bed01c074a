"""The one place that imports TensorFlow-private modules; each import says why.

Version workarounds live here too, so the rest of the package uses only
public TensorFlow and Keras APIs plus the names below.
"""

__all__ = [
    "MirroredExtended",
    "device_util",
    "distribute_values",
    "get_devices_from",
    "input_util",
    "regroup",
    "unordered_in_functions",
    "xplane_pb2",
]

# --- data parallel ------------------------------------------------------
# tf.distribute has no public way to build a strategy whose extended object
# differs from MirroredStrategy's (needed to route reductions and updates to
# our cross-device ops and to reject variables created outside the scope).
from tensorflow.python.distribute.mirrored_strategy import (  # noqa: E402
    MirroredExtended as MirroredExtended,
)

# Mirrored / PerReplica values have no public constructor; a CrossDeviceOps
# subclass must return them (the public base class expects these types).
from tensorflow.python.distribute import (  # noqa: E402, F401
    values as distribute_values,
)

# `regroup` turns per-device results into Mirrored values the way the built-in
# CrossDeviceOps do; not exported publicly.
from tensorflow.python.distribute.distribute_utils import (  # noqa: E402
    regroup as regroup,
)

# Device lists of DistributedValues / variables / strings, canonicalised the
# way the built-in CrossDeviceOps compare them; not exported publicly.
from tensorflow.python.distribute.cross_device_ops import (  # noqa: E402
    get_devices_from as get_devices_from,
)

# Canonical device names (resolving partial specs against a default device),
# as tf.distribute itself compares them; no public equivalent.
from tensorflow.python.distribute import (  # noqa: E402
    device_util as device_util,
)

# --- multi-process data parallel -----------------------------------------
# Building a distributed dataset with an InputContext (rank sharding plus
# rebatching of the global batch) is what MultiWorkerMirroredStrategy does;
# the helpers that do it are not exported publicly.
from tensorflow.python.distribute import input_util  # noqa: E402


# --- pipeline parallel ----------------------------------------------------
def xplane_pb2() -> object:
    """The XSpace protobuf module of TensorFlow's profiler traces.

    `tf.profiler.experimental` writes `*.xplane.pb` files but exports no
    reader; the generated protobuf module ships only under `tensorflow.tsl`.
    Imported lazily: only timeline tracing needs it.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2 as module

    return module


# --- Horovod-compatible collectives -----------------------------------------
_unordered_types: set = set()


def unordered_in_functions(op_types: frozenset) -> None:
    """Lets stateful ops of `op_types` run in any order inside a tf.function.

    tf.function's automatic control dependencies chain every stateful op
    without resource inputs in program order, so each collective would wait
    for the previous one to finish: no fusion, and no freedom of order that
    name matching exists for. The ops stay stateful (never constant-folded,
    deduplicated or pruned); each is given its own output as the only
    "resource" it writes, so it is ordered against nothing. TensorFlow
    exposes no public way to declare an op order-insensitive; the
    resource-resolver registry is the hook its own collectives use.
    Idempotent.

    Args:
        op_types: op type names, e.g. `{"SmdistHvdAllreduce"}`.
    """
    # The resolver registry (see the docstring) is not exported publicly.
    from tensorflow.python.framework import auto_control_deps

    first = not _unordered_types
    _unordered_types.update(op_types)
    if not first:
        return

    def _smdist_unordered_collectives(op, reads, writes) -> bool:
        del reads
        if op.type not in _unordered_types or not op.outputs:
            return False
        own = op.outputs[0]
        if own in writes:
            return False
        writes.add(own)
        return True

    auto_control_deps.register_acd_resource_resolver(_smdist_unordered_collectives)
