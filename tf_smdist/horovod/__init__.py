"""Horovod's TensorFlow API on tf_smdist's MPI engine, for Keras 3.

A Horovod script changes one line,

    import horovod.tensorflow as hvd   ->   import tf_smdist.horovod as hvd

(and `horovod.tensorflow.keras` -> `tf_smdist.horovod.keras`) and runs on
TensorFlow 2.21 / Keras 3, started by `python -m tf_smdist.launch --nproc N
train.py` or `mpirun -np N python train.py`. Elastic training runs at a
fixed size (no process joins or leaves); Adasum, NCCL and Gloo are not
provided; see the README's "Coming from Horovod" section.

Example:
>>> import tf_smdist.horovod as hvd
>>> hvd.init()
>>> hvd.allreduce(tf.constant([1.0, 2.0])).numpy()
array([1., 2.], dtype=float32)
"""

from __future__ import annotations

from tf_smdist.horovod import elastic
from tf_smdist.horovod.basics import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_rank_op,
    local_size,
    local_size_op,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    process_set_included_op,
    rank,
    rank_op,
    rocm_built,
    shutdown,
    size,
    size_op,
    start_timeline,
    stop_timeline,
    sycl_built,
)
from tf_smdist.horovod.collectives import (
    allgather,
    allreduce,
    alltoall,
    barrier,
    broadcast,
    broadcast_,
    broadcast_variables,
    grouped_allgather,
    grouped_allreduce,
    grouped_reducescatter,
    join,
    reducescatter,
)
from tf_smdist.horovod.compression import Compression
from tf_smdist.horovod.global_variables import (
    BroadcastGlobalVariablesHook,
    broadcast_global_variables,
)
from tf_smdist.horovod.objects import (
    allgather_object,
    broadcast_object,
    broadcast_object_fn,
)
from tf_smdist.horovod.optimizer import DistributedOptimizer
from tf_smdist.horovod.process_sets import (
    ProcessSet,
    add_process_set,
    global_process_set,
    remove_process_set,
)
from tf_smdist.horovod.sync_batch_norm import SyncBatchNormalization
from tf_smdist.horovod.tape import (
    DistributedGradientTape,
    PartialDistributedGradientTape,
)

# Horovod's namespace has this underscored helper too; its tests call it.
from tf_smdist.horovod.util import _executing_eagerly  # noqa: F401

__all__ = [
    "Adasum",
    "Average",
    "BroadcastGlobalVariablesHook",
    "Compression",
    "DistributedGradientTape",
    "DistributedOptimizer",
    "Max",
    "Min",
    "PartialDistributedGradientTape",
    "ProcessSet",
    "Product",
    "Sum",
    "SyncBatchNormalization",
    "add_process_set",
    "allgather",
    "allgather_object",
    "allreduce",
    "alltoall",
    "barrier",
    "broadcast",
    "broadcast_",
    "broadcast_global_variables",
    "broadcast_object",
    "broadcast_object_fn",
    "broadcast_variables",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "elastic",
    "gloo_built",
    "gloo_enabled",
    "global_process_set",
    "grouped_allgather",
    "grouped_allreduce",
    "grouped_reducescatter",
    "init",
    "is_homogeneous",
    "is_initialized",
    "join",
    "local_rank",
    "local_rank_op",
    "local_size",
    "local_size_op",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "process_set_included_op",
    "rank",
    "rank_op",
    "reducescatter",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "size_op",
    "sycl_built",
    "start_timeline",
    "stop_timeline",
]
