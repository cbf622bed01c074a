"""One process per pipeline stage: its task chain, messages and all-reduce.

In a job of `N` processes with `K` stages, each process runs the tasks of its
stage (with `"interleaved"`, of its `v` virtual stages) in the order of
`Schedule.device_orders[stage]`, the same per-rank action lists the
one-process runtime runs. A tensor one stage computes and another consumes
travels as an MPI message (`_mpi_ops.send` / `_mpi_ops.recv`, tags from
`routing.TransferPlan`), forward for activations and backward for their
gradients. Inside a `tf.function` TensorFlow runs the job's stateful ops
(messages, all-reduces) in the order they were created, which here is the
schedule's order; a send completes as soon as the communication thread has
it, so no order between ranks can deadlock (exactly the schedule's own
dependency rule: a task waits only for its inputs).

Each stage's gradients are then summed over its data-parallel group (the
stage's processes in the `N / K` pipelines), bucket by bucket, on a
sub-communicator, started right after the stage's last backward task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.data_parallel.buckets import plan_buckets
from tf_smdist.pipeline import routing
from tf_smdist.pipeline.execution import (
    DeferredWeightGradients,
    add_gradient,
    loss_seeds,
    slice_values,
    split_microbatches,
    task_scope,
)
from tf_smdist.pipeline.graph import LayerGraph, flatten_model
from tf_smdist.pipeline.schedule import Schedule
from tf_smdist.pipeline.topology import Topology

__all__ = ["ProcessPipeline", "local_device", "local_rank"]

logger = logging.getLogger(__name__)

_COMPRESSION = {None: None, "fp16": tf.float16, "bf16": tf.bfloat16}
_LOCAL_RANK_VARS = (
    "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
    "MV2_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK",
)
_RECORD_BYTES = 4096
# Ordering groups of the sub-communicators (each has 8).
_GRAD_GROUP = 1
_SPARSE_GROUP = 2  # the all-gathers of sparse gradients
_STATE_GROUP = 3  # the mean of non-trainable state (moving statistics)

LossFn = Callable[[int, list[tf.Tensor]], tf.Tensor]


def local_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank among the job's processes on its host.

    Args:
        environ: the environment to read. Defaults to `os.environ`.

    Example:
    >>> local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "3"})
    3
    """
    env = os.environ if environ is None else environ
    for var in _LOCAL_RANK_VARS:
        if var in env:
            try:
                return int(env[var])
            except ValueError:
                continue
    return 0


def local_device() -> str:
    """The device of this process's stage: its `local_rank`-th GPU, else its CPU.

    Example:
    >>> local_device()  # on a host without GPUs
    '/CPU:0'
    """
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return gpus[local_rank() % len(gpus)].name
    return "/CPU:0"


def _differentiable(dtype: tf.DType) -> bool:
    return dtype.is_floating or dtype.is_complex


def _mpi() -> Any:
    from tf_smdist import _mpi_ops  # noqa: PLC0415 (only multi-process jobs)

    return _mpi_ops


class ProcessPipeline:
    """This process's share of a pipeline trained by one process per stage.

    Built by `PipelineModel` when the job has several processes; every
    process builds one, in the same order (it creates the sub-communicators
    and checks that every rank agrees on the model, the partition and the
    schedule). The wrapped model exists whole in every process; this process
    runs, trains and keeps optimizer state for its stage's layers only.

    Args:
        model: the wrapped Keras model (Sequential or functional).
        stage_names: the layer names of each (virtual) stage.
        schedule: the schedule; stage `s` runs on the process of pipeline
            stage `schedule.device_of(s)`.
        topology: this process's coordinates.
        compression: `None`, `"fp16"` or `"bf16"`: the dtype floating
            activations and their gradients travel in. Defaults to `None`.
        recompute: recompute each stage's forward in its backward.
            Defaults to `False`.
        defer_weight_gradients: compute each stage's dense-layer weight
            gradients in two products per step, around its last backward
            task (`DeferredWeightGradients`); ignored with `recompute`.
            Defaults to `False`.
        bucket_cap_mb: the fusion-bucket cap of the gradient all-reduce.
            Defaults to `25.0`.
        placement_summary: extra text compared across ranks at start-up.
            Defaults to `""`.
        graph: the model's `LayerGraph` whose node names `stage_names`
            uses. Defaults to `None`: `flatten_model(model,
            expand_nested=False)`.

    Example:
    ```python
    topo = Topology(cluster.size(), 2, rank=cluster.rank())
    runtime = ProcessPipeline(model, [["d0"], ["d1"]], one_f_one_b(2, 4), topo)
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        stage_names: Sequence[Sequence[str]],
        schedule: Schedule,
        topology: Topology,
        *,
        compression: str | None = None,
        recompute: bool = False,
        defer_weight_gradients: bool = False,
        bucket_cap_mb: float = 25.0,
        placement_summary: str = "",
        graph: LayerGraph | None = None,
    ) -> None:
        if compression not in _COMPRESSION:
            raise ValueError(
                "Unknown transfer compression. Received: "
                f"compression={compression!r}. Use None, 'fp16' or 'bf16'."
            )
        if schedule.num_devices != topology.stage_size:
            raise ValueError(
                "The schedule and the topology disagree on the number of "
                f"stages. Received: {schedule.num_devices} and "
                f"{topology.stage_size}."
            )
        self._model = model
        self._schedule = schedule
        self._topo = topology
        self._compression = _COMPRESSION[compression]
        self._compression_name = compression
        self._recompute = bool(recompute)
        self._defer_weights = bool(defer_weight_gradients)
        # Per local stage, how many variables' gradients the last traced
        # step deferred (see `DeferredWeightGradients`).
        self.deferred_weight_gradients: dict[int, int] = {}
        self._bucket_cap_mb = float(bucket_cap_mb)
        self._device = local_device()
        self._graph: LayerGraph = (
            graph if graph is not None else flatten_model(model, expand_nested=False))
        self._assign(stage_names)
        self._my_stages = [
            s for s in range(schedule.num_stages)
            if schedule.device_of(s) == topology.stage_rank
        ]
        self._order = list(schedule.device_orders[topology.stage_rank])
        self._specs = self._tensor_specs()
        self._handshake(stage_names, placement_summary)
        self._create_comms()
        self._world_group = self._allocate_world_group()
        self._finite_group = self._allocate_world_group()  # loss scaling's flag
        self.broadcast_weights(root=0)
        logger.info(
            "Pipeline process rank %d: stage %d of %d (virtual stages %s), "
            "pipeline %d of %d on %s", topology.rank, topology.stage_rank,
            topology.stage_size, self._my_stages, topology.dp_rank,
            topology.dp_size, self._device)

    # -- the split ------------------------------------------------------------

    def _assign(self, stage_names: Sequence[Sequence[str]]) -> None:
        graph = self._graph
        num = len(stage_names)
        of_name = {n: s for s, names in enumerate(stage_names) for n in names}
        producer = {k: -1 for k in graph.inputs}
        nodes: list[list[Any]] = [[] for _ in range(num)]
        for node in graph.nodes:
            earliest = max((producer[k] for k in node.inputs), default=0)
            s = of_name.get(node.name)
            if s is None:
                if node.is_layer:
                    raise ValueError(
                        f"Layer {node.name!r} is in no stage. Received: "
                        f"stage_names={list(map(list, stage_names))}. Put every "
                        "layer in one stage."
                    )
                s = max(earliest, 0)  # an operation goes with its inputs
            nodes[s].append(node)
            for k in node.outputs:
                producer[k] = s
        self._stage_nodes = nodes
        consumed = [[k for n in ns for k in n.inputs] for ns in nodes]
        produced = [[k for n in ns for k in n.outputs] for ns in nodes]
        self._plan = routing.plan_transfers(
            consumed, produced, graph.inputs, graph.outputs,
            self._schedule.num_microbatches)
        self._stage_layers = []
        for ns in nodes:
            layers, seen = [], set()
            for n in ns:
                if n.is_layer and id(n.operation) not in seen:
                    seen.add(id(n.operation))
                    layers.append(n.operation)
            self._stage_layers.append(layers)

    def _tensor_specs(self) -> dict[str, tuple[tuple[int, ...], tf.DType]]:
        """Each graph tensor's shape without the batch, and dtype.

        Measured by running the whole model once on one sample of zeros (the
        model is whole in every process), so every rank knows the size of
        every message without asking its sender.
        """
        sample = []
        for t in self._model.inputs:
            dims = list(t.shape)[1:]
            if any(d is None for d in dims):
                raise ValueError(
                    "Pipeline stages in separate processes need inputs whose "
                    "shape is fixed apart from the batch. Received: input "
                    f"{t.name!r} of shape {tuple(t.shape)}. Give the Input a "
                    "full shape (pad variable-length inputs)."
                )
            sample.append(tf.zeros([1, *dims], dtype=t.dtype))
        values = self._graph.run(sample, training=False)
        specs = {}
        for key, value in values.items():
            value = tf.convert_to_tensor(value)
            specs[key] = (tuple(int(d) for d in value.shape[1:]), value.dtype)
        return specs

    # -- start-up: agreement, communicators, weights ---------------------------

    def _fields(
        self, stage_names: Sequence[Sequence[str]], placement_summary: str
    ) -> dict[str, str]:
        structure = [
            (n.name, type(n.operation).__name__, n.inputs, n.outputs,
             [(tuple(v.shape), str(v.dtype))
              for v in getattr(n.operation, "weights", [])])
            for n in self._graph.nodes
        ]
        digest = hashlib.sha256(repr(structure).encode()).hexdigest()[:12]
        sizes = [len(names) for names in stage_names]
        parts = hashlib.sha256(repr([list(n) for n in stage_names]).encode())
        s = self._schedule
        return {
            "model structure": f"{digest} ({len(self._graph.nodes)} layers)",
            "partition": f"{parts.hexdigest()[:8]} (stage sizes {sizes})",
            "schedule": (f"{s.name}, virtual_stages={s.virtual_stages}"),
            "microbatches": str(s.num_microbatches),
            "num_stages": str(self._topo.stage_size),
            "placement": self._topo.placement + placement_summary,
            "transfer compression": str(self._compression_name),
            "recompute": str(self._recompute),
            # The gradient buckets of a data-parallel group must match.
            "bucket_cap_mb": str(self._bucket_cap_mb),
        }

    def _handshake(
        self, stage_names: Sequence[Sequence[str]], placement_summary: str
    ) -> None:
        fields = self._fields(stage_names, placement_summary)
        raw = json.dumps(fields, sort_keys=True).encode()[:_RECORD_BYTES]
        records = _mpi().allgather_bytes(raw.ljust(_RECORD_BYTES, b"\0"))
        parsed = []
        for r in records:
            try:
                parsed.append(json.loads(r.rstrip(b"\0").decode()))
            except ValueError:
                parsed.append({})
        problems = []
        for name in fields:
            values = [p.get(name) for p in parsed]
            if len(set(values)) > 1:
                listing = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
                problems.append(f"the {name} differs ({listing})")
        if problems:
            raise ValueError(
                "The pipeline processes disagree, so their messages would not "
                "match. Received: " + "; ".join(problems) + ". Run the same "
                "script with the same model, partition and PipelineModel "
                "arguments on every rank (pass an explicit partition, or a "
                "saved Partition, if automatic partitions differ)."
            )

    def _create_comms(self) -> None:
        mpi = _mpi()
        topo = self._topo
        self._pipe_comm = -1
        for ranks in topo.pipelines():
            comm = mpi.create_comm(ranks)
            if topo.rank in ranks:
                self._pipe_comm = comm
        self._dp_comm = -1
        if topo.dp_size > 1:
            for ranks in topo.dp_groups():
                comm = mpi.create_comm(ranks)
                if topo.rank in ranks:
                    self._dp_comm = comm

    def _allocate_world_group(self) -> int:
        from tf_smdist.data_parallel import cluster  # noqa: PLC0415

        return cluster.allocate_group()

    def owner(self, stage: int) -> int:
        """The world rank that holds `stage`'s reference values (pipeline 0).

        Example:
        >>> runtime.owner(1)  # doctest: +SKIP
        1
        """
        return self._topo.rank_of(self._schedule.device_of(stage), 0)

    def broadcast_weights(self, *, root: int | None = None) -> None:
        """Makes every variable of the model equal on every rank (eager).

        With `root`, every variable takes `root`'s value (start-up). Without
        it, each stage's variables take their owner's values (`owner`), so the
        whole model is current on every rank (before saving or reading it).
        Every rank must call it at the same point.

        Args:
            root: one world rank for every variable. Defaults to `None`.

        Example:
        ```python
        runtime.broadcast_weights()
        weights = model.get_weights()  # the trained model, on every rank
        ```
        """
        mpi = _mpi()
        for s, layers in enumerate(self._stage_layers):
            src = root if root is not None else self.owner(s)
            for layer in layers:
                for v in layer.weights:
                    v.assign(mpi.broadcast(tf.convert_to_tensor(v.value), root=src))

    # -- this process's share -------------------------------------------------

    @property
    def topology(self) -> Topology:
        """This process's coordinates."""
        return self._topo

    @property
    def device(self) -> str:
        """The device this process's stage runs on."""
        return self._device

    @property
    def local_stages(self) -> list[int]:
        """The (virtual) stages this process runs."""
        return list(self._my_stages)

    @property
    def pipeline_comm(self) -> int:
        """The communicator of this process's pipeline (ranks = stages)."""
        return self._pipe_comm

    @property
    def transfer_plan(self) -> routing.TransferPlan:
        """Which tensors travel between which stages."""
        return self._plan

    def stage_layers(self, stage: int) -> list[keras.layers.Layer]:
        """The layers of (virtual) stage `stage`."""
        return list(self._stage_layers[stage])

    @property
    def trainable_variables(self) -> list[Any]:
        """The trainable variables this process trains, in model order."""
        mine = {id(v) for s in self._my_stages for layer in self._stage_layers[s]
                for v in layer.trainable_weights}
        return [v for v in self._model.trainable_variables if id(v) in mine]

    @property
    def variables(self) -> list[Any]:
        """Every variable of this process's stage(s), in model order."""
        mine = {id(v) for s in self._my_stages for layer in self._stage_layers[s]
                for v in layer.weights}
        return [v for v in self._model.weights if id(v) in mine]

    @property
    def is_last(self) -> bool:
        """Whether this process runs the last stage (computes the loss)."""
        return self._schedule.num_stages - 1 in self._my_stages

    def output_specs(self) -> list[tuple[tuple[int, ...], tf.DType]]:
        """Each model output's shape without the batch, and dtype."""
        return [self._specs[k] for k in self._graph.outputs]

    # -- batches ----------------------------------------------------------------

    def shard(
        self, tensors: Sequence[tf.Tensor], *, even: bool = True
    ) -> list[list[tf.Tensor]]:
        """This pipeline's share of a global batch, cut into micro-batches.

        The global batch is cut into `dp_size` contiguous shards, one per
        pipeline in data-parallel rank order (as `DataParallelStrategy`
        shards across processes), and each shard into `M` micro-batches.

        Args:
            tensors: the global batch's tensors (same first dimension).
            even: require the global batch to be a multiple of
                `M * dp_size`; otherwise shards and micro-batches differ by at
                most one row. Defaults to `True`.

        Returns:
            Per micro-batch, this process's slices of `tensors`.

        Example:
        ```python
        micro_x = runtime.shard([x])   # x: the global batch
        ```
        """
        d, dp = self._topo.dp_rank, self._topo.dp_size
        m = self._schedule.num_microbatches
        tensors = [tf.convert_to_tensor(t) for t in tensors]
        if not tensors:
            return [[] for _ in range(m)]
        static = tensors[0].shape[0]
        if even and static is not None and static % (m * dp):
            raise ValueError(
                "The global batch must be a multiple of the number of "
                "micro-batches times the number of pipelines. Received: batch "
                f"size {static} with microbatches={m} and {dp} pipeline(s) "
                f"(data-parallel size). Use a batch size divisible by {m * dp} "
                "(for datasets, batch with `drop_remainder=True`)."
            )
        shards = []
        for t in tensors:
            n = tf.shape(t)[0]
            if even:
                if static is None:
                    check = tf.debugging.assert_equal(
                        n % (m * dp), 0, message=(
                            "The global batch must be a multiple of the number "
                            "of micro-batches times the number of pipelines "
                            f"(microbatches={m}, {dp} pipeline(s)). Use a batch "
                            f"size divisible by {m * dp}; a dataset's last "
                            "partial batch is the usual cause: batch it with "
                            "`drop_remainder=True`."))
                    with tf.control_dependencies([check]):
                        n = tf.identity(n)
                size = n // dp
                start = d * size
            else:
                base, extra = n // dp, n % dp
                size = base + tf.cast(d < extra, n.dtype)
                start = d * base + tf.minimum(d, extra)
            shards.append(t[start:start + size])
        return split_microbatches(shards, m, even=even)

    # -- messages ---------------------------------------------------------------

    def _peer(self, stage: int) -> int:
        return self._schedule.device_of(stage)

    def _is_local(self, stage: int) -> bool:
        return self._schedule.device_of(stage) == self._topo.stage_rank

    def _wire(self, dtype: tf.DType) -> tf.DType:
        if self._compression is not None and dtype.is_floating:
            return self._compression
        return dtype

    def _send(self, value: tf.Tensor, edge: routing.Edge, m: int, *,
              backward: bool) -> tf.Tensor:
        peer = self._peer(edge.src if backward else edge.dst)
        tag = self._plan.tag(edge, m, backward=backward)
        wire = self._wire(value.dtype)
        if wire != value.dtype:
            value = tf.cast(value, wire)
        with tf.device("/CPU:0"):
            return _mpi().send(value, peer=peer, tag=tag, comm=self._pipe_comm)

    def _recv(self, edge: routing.Edge, m: int, rows: tf.Tensor, *,
              backward: bool) -> tf.Tensor:
        shape, dtype = self._specs[edge.key]
        peer = self._peer(edge.dst if backward else edge.src)
        tag = self._plan.tag(edge, m, backward=backward)
        full = tf.concat([tf.reshape(tf.cast(rows, tf.int64), [1]),
                          tf.constant(shape, tf.int64)], 0)
        with tf.device("/CPU:0"):
            value = _mpi().recv(full, self._wire(dtype), peer=peer, tag=tag,
                                comm=self._pipe_comm)
        value = tf.ensure_shape(value, [None, *shape])
        return value if value.dtype == dtype else tf.cast(value, dtype)

    # -- running the stage's tasks ------------------------------------------------

    def _run_nodes(self, stage: int, values: dict[str, tf.Tensor],
                   training: bool | None) -> dict[str, tf.Tensor]:
        values = dict(values)
        for node in self._stage_nodes[stage]:
            values.update(zip(node.outputs, node.call(values, training=training)))
        return values

    def _stage_inputs(self, s: int, m: int, micro_x: Sequence[Sequence[tf.Tensor]],
                      local_out: dict, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        index = {k: i for i, k in enumerate(self._graph.inputs)}
        values = {k: tf.identity(micro_x[m][index[k]])
                  for k in self._plan.local_inputs(s)}
        for e in self._plan.incoming(s):
            if self._is_local(e.src):
                values[e.key] = tf.identity(local_out[(e.src, m)][e.key])
            else:
                values[e.key] = self._recv(e, m, rows, backward=False)
        return values

    def forward(
        self, micro_x: Sequence[Sequence[tf.Tensor]], *, training: bool | None = None,
        loss_fn: LossFn | None = None,
    ) -> tuple[list[list[tf.Tensor]] | None, list[tf.Tensor]]:
        """Runs this process's forward tasks in schedule order.

        Args:
            micro_x: per micro-batch, this pipeline's model inputs (`shard`).
            training: passed to the layers. Defaults to `None`.
            loss_fn: on the last stage, the loss of micro-batch `m` given the
                model outputs. Defaults to `None` (no loss).

        Returns:
            `(outputs, losses)`: on the last stage, per micro-batch the model
            outputs, and per micro-batch the loss (with `loss_fn`); `None`
            and `[]` on other stages.

        Example:
        ```python
        outputs, _ = runtime.forward(runtime.shard([x], even=False))
        ```
        """
        last = self._schedule.num_stages - 1
        chain: list[tf.Operation] = []
        local_out: dict[tuple[int, int], dict[str, tf.Tensor]] = {}
        outs: dict[int, list[tf.Tensor]] = {}
        losses: dict[int, tf.Tensor] = {}
        for task in self._order:
            if task.kind != "F":
                continue
            s, m = task.stage, task.microbatch
            rows = tf.shape(micro_x[m][0])[0]
            with tf.name_scope(task_scope("F", s, m)), tf.device(self._device):
                with tf.control_dependencies(chain):
                    inputs = self._stage_inputs(s, m, micro_x, local_out, rows)
                    values = self._run_nodes(s, inputs, training)
                done = self._after_forward(s, m, values, local_out)
                if s == last:
                    outs[m] = [values[k] for k in self._graph.outputs]
                    done += outs[m]
                    if loss_fn is not None:
                        losses[m] = loss_fn(m, outs[m])
                        done.append(losses[m])
            chain = [tf.group(*done)] if not tf.executing_eagerly() else []
        if not self.is_last:
            return None, []
        m_total = self._schedule.num_microbatches
        return ([outs[m] for m in range(m_total)],
                [losses[m] for m in range(m_total)] if loss_fn else [])

    def _after_forward(self, s: int, m: int, values: dict[str, tf.Tensor],
                       local_out: dict) -> list[tf.Tensor]:
        outgoing = self._plan.outgoing(s)
        local_out[(s, m)] = {e.key: values[e.key] for e in outgoing}
        done = [values[e.key] for e in outgoing]
        for e in outgoing:
            if not self._is_local(e.dst):
                # The next task waits for the send to be posted: with one
                # inter-op thread it would otherwise run first, and the peer
                # would wait for it too.
                done.append(self._send(values[e.key], e, m, backward=False))
        return done

    def train(
        self, micro_x: Sequence[Sequence[tf.Tensor]], loss_fn: LossFn, *,
        gradient_scale: float = 1.0, loss_scale: Any = None,
    ) -> tuple[list[list[tf.Tensor]] | None, list[tf.Tensor], list[tf.Tensor]]:
        """Runs this process's forward and backward tasks; reduces gradients.

        Args:
            micro_x: per micro-batch, this pipeline's model inputs (`shard`).
            loss_fn: the loss of micro-batch `m` given the model outputs
                (already weighted for summing over micro-batches), computed on
                the last stage.
            gradient_scale: multiplies the gradients summed over the
                data-parallel group (`1 / dp_size` for a mean over the global
                batch). Defaults to `1.0`.
            loss_scale: differentiate `loss_scale * loss` (mixed precision's
                loss scaling); the losses returned stay unscaled. Defaults to
                `None` (1).

        Returns:
            `(outputs, losses, grads)`: on the last stage the model outputs
            and the losses per micro-batch (`None` and `[]` elsewhere), and
            one gradient per variable of `trainable_variables`, summed over
            micro-batches and the data-parallel group, scaled.

        Example:
        ```python
        micro_x = runtime.shard([x])
        micro_y = runtime.shard([y])
        _, losses, grads = runtime.train(
            micro_x, lambda m, out: mse(micro_y[m][0], out[0]) / 4,
            gradient_scale=1 / runtime.topology.dp_size)
        ```
        """
        last = self._schedule.num_stages - 1
        chain: list[tf.Operation] = []
        local_out: dict[tuple[int, int], dict[str, tf.Tensor]] = {}
        local_grad: dict[tuple[int, int], tf.Tensor] = {}
        saved: dict[tuple[int, int], tuple] = {}
        outs: dict[int, list[tf.Tensor]] = {}
        losses: dict[int, tf.Tensor] = {}
        grads: dict[int, list[tf.Tensor]] = {}
        reduced: dict[int, list[tf.Tensor]] = {}
        last_backward = {t.stage: i for i, t in enumerate(self._order) if t.kind == "B"}
        finish_order = sorted(self._my_stages, key=lambda s: last_backward[s])

        def forward(s: int, m: int, inputs: dict[str, tf.Tensor]):
            values = self._run_nodes(s, inputs, True)
            loss = None
            if s == last:
                outs[m] = [values[k] for k in self._graph.outputs]
                loss = loss_fn(m, outs[m])
            return values, loss

        def watched(inputs: dict[str, tf.Tensor]) -> list[str]:
            return [k for k in inputs if k not in self._plan.local_inputs(s)
                    and _differentiable(inputs[k].dtype)]

        defer = ({s: DeferredWeightGradients(self._stage_variables(s))
                  for s in self._my_stages}
                 if self._defer_weights and not self._recompute else {})
        for index, task in enumerate(self._order):
            s, m = task.stage, task.microbatch
            rows = tf.shape(micro_x[m][0])[0]
            variables = self._stage_variables(s)
            with tf.name_scope(task_scope(task.kind, s, m)), tf.device(self._device):
                if task.kind == "F":
                    with tf.control_dependencies(chain):
                        inputs = self._stage_inputs(s, m, micro_x, local_out, rows)
                        if self._recompute:
                            values, loss = forward(s, m, inputs)
                            saved[(s, m)] = (inputs, None, None)
                        else:
                            with tf.GradientTape() as tape:
                                tape.watch([inputs[k] for k in watched(inputs)])
                                values, loss = forward(s, m, inputs)
                            saved[(s, m)] = (inputs, values, loss, tape)
                    done = self._after_forward(s, m, values, local_out)
                    if loss is not None:
                        losses[m] = loss
                        done.append(loss)
                else:
                    entry = saved.pop((s, m))
                    inputs = entry[0]
                    if s in defer and index == last_backward[s] and defer[s].pending:
                        # The products of the micro-batches done so far, for
                        # the time the stage waits for its last output
                        # gradient (the cooldown's wait; no op waits on them).
                        with tf.control_dependencies(chain):
                            grads[s] = defer[s].flush(grads[s])
                    with tf.control_dependencies(chain):
                        if self._recompute:
                            inputs = {k: tf.identity(v) for k, v in inputs.items()}
                            with tf.GradientTape() as tape:
                                tape.watch([inputs[k] for k in watched(inputs)])
                                values, loss = forward(s, m, inputs)
                        else:
                            _, values, loss, tape = entry
                        targets, seeds = self._seeds(s, m, values, loss, local_grad,
                                                     rows, loss_scale)
                        sources = watched(inputs)
                        # With deferred weight gradients a variable may get
                        # none from the tape (None, not zeros: no addition).
                        with _compat.small_rows_matmul_gradients(
                                self._device, defer=defer.get(s)):
                            result = tape.gradient(
                                targets, [inputs[k] for k in sources] + variables,
                                output_gradients=seeds,
                                unconnected_gradients=(
                                    tf.UnconnectedGradients.NONE if s in defer
                                    else tf.UnconnectedGradients.ZERO))
                    input_grads = {
                        k: tf.zeros_like(inputs[k]) if g is None else g
                        for k, g in zip(sources, result[: len(sources)])}
                    # Sparse gradients (an embedding's) stay IndexedSlices, as
                    # in plain Keras: its optimizers treat a row repeated in
                    # them otherwise than the dense sum (Adam squares each).
                    var_grads = [g if g is None or isinstance(g, tf.IndexedSlices)
                                 else tf.convert_to_tensor(g)
                                 for g in result[len(sources):]]
                    done = [slice_values(g) for g in var_grads if g is not None]
                    for e in self._plan.incoming(s):
                        if e.key not in input_grads:
                            continue
                        g = input_grads[e.key]
                        done.append(g)
                        if self._is_local(e.src):
                            local_grad[(e.index, m)] = g
                        else:
                            done.append(self._send(g, e, m, backward=True))
                    grads[s] = (var_grads if s not in grads else
                                [add_gradient(a, g)
                                 for a, g in zip(grads[s], var_grads)])
                    if s in defer and index == last_backward[s]:
                        # The stage's deferred weight gradients, after its
                        # last backward task's work and messages.
                        self.deferred_weight_gradients[s] = defer[s].deferred
                        with tf.control_dependencies(done):
                            grads[s] = defer[s].finish(grads[s])
                        done = [slice_values(g) for g in grads[s]]
            chain = [tf.group(*done)] if not tf.executing_eagerly() else []
        # Each stage's reduction starts when its gradients are ready (its last
        # backward task), whenever it is built: built here, once every stage's
        # sparse gradients are known, which the bucket plans leave out.
        positions = self._bucket_positions(finish_order, grads)
        sparse_chain: list[tf.Tensor] = []
        for s in finish_order:
            reduced[s] = self._reduce(s, grads[s], positions, gradient_scale,
                                      sparse_chain)
        by_id = {id(v): g for s in self._my_stages
                 for v, g in zip([v for layer in self._stage_layers[s]
                                  for v in layer.trainable_weights], reduced[s])}
        all_grads = [by_id[id(v)] for v in self.trainable_variables]
        m_total = self._schedule.num_microbatches
        if not self.is_last:
            return None, [], all_grads
        return ([outs[m] for m in range(m_total)],
                [losses[m] for m in range(m_total)], all_grads)

    def _stage_variables(self, s: int) -> list[Any]:
        return [v for layer in self._stage_layers[s] for v in layer.trainable_weights]

    def _seeds(self, s: int, m: int, values: dict[str, tf.Tensor],
               loss: tf.Tensor | None, local_grad: dict, rows: tf.Tensor,
               loss_scale: Any = None):
        if s == self._schedule.num_stages - 1:
            return [loss], loss_seeds(loss, loss_scale)
        dys: dict[str, tf.Tensor] = {}
        for e in self._plan.outgoing(s):
            if not _differentiable(self._specs[e.key][1]):
                continue
            if self._is_local(e.dst):
                g = local_grad.pop((e.index, m))
            else:
                g = self._recv(e, m, rows, backward=True)
            dys[e.key] = g if e.key not in dys else dys[e.key] + g
        keys = list(dys)
        return [values[k] for k in keys], [dys[k] for k in keys]

    # -- gradients across the data-parallel group --------------------------------

    def _bucket_positions(self, finish_order: Sequence[int],
                          grads: dict[int, list[Any]]) -> dict:
        """Plans each stage's buckets of dense gradients (sparse ones are
        gathered instead) and numbers them across this process's stages."""
        positions: dict[tuple[int, int], int] = {}
        self._plans = {}
        for s in finish_order:
            variables = [v for layer in self._stage_layers[s]
                         for v in layer.trainable_weights]
            dense = [i for i, g in enumerate(grads[s])
                     if not isinstance(g, tf.IndexedSlices)]
            plan = plan_buckets([tuple(variables[i].shape) for i in dense],
                                [str(variables[i].dtype) for i in dense],
                                bucket_cap_mb=self._bucket_cap_mb)
            self._plans[s] = (plan, dense)
            for b in plan.buckets:
                if b.num_elements:
                    positions[(s, b.index)] = len(positions)
        return positions

    def _reduce(self, s: int, grads: list[Any], positions: dict,
                scale: float, sparse_chain: list[tf.Tensor]) -> list[Any]:
        if self._topo.dp_size == 1:
            return [scaled(g, scale) for g in grads]
        out = [self._gather_slices(g, scale, sparse_chain)
               if isinstance(g, tf.IndexedSlices) else g for g in grads]
        total = max(1, len(positions))
        plan, dense = self._plans[s]
        for b in plan.buckets:
            if not b.num_elements:
                continue
            members = [dense[i] for i in b.tensor_indices]
            flat = tf.concat([tf.reshape(grads[i], [-1]) for i in members], 0)
            with tf.device("/CPU:0"):
                summed = _mpi().host_allreduce(
                    flat, group=_GRAD_GROUP, index=positions[(s, b.index)],
                    group_size=total, comm=self._dp_comm)
            with tf.device(self._device):
                if scale != 1.0:
                    summed = summed * tf.cast(scale, summed.dtype)
                sizes = [int(np.prod(shape)) for shape in b.shapes]
                for i, part, shape in zip(members, tf.split(summed, sizes), b.shapes):
                    out[i] = tf.reshape(part, shape)
        return out

    def _gather_slices(self, g: tf.IndexedSlices, scale: float,
                       chain: list[tf.Tensor]) -> tf.IndexedSlices:
        """A sparse gradient over the data-parallel group: every rank's rows
        concatenated in rank order (as plain Keras holds the whole batch's),
        scaled. The gathers of one step are chained, so every rank issues
        them in the same order."""
        with tf.device("/CPU:0"), tf.control_dependencies(chain[-1:]):
            rows, indices = _mpi().allgather_slices(
                g.values, g.indices, g.values.shape[1:], group=_SPARSE_GROUP,
                comm=self._dp_comm)
            values = tf.reshape(rows, [-1, *g.values.shape[1:]])
        chain.append(indices)
        with tf.device(self._device):
            return scaled(tf.IndexedSlices(values, indices, g.dense_shape), scale)

    def average_state(self) -> list[Any]:
        """Averages this stage's non-trainable float variables over the
        data-parallel group, in place, after a training step.

        BatchNormalization's moving statistics are updated by each pipeline
        from its own share of the batch; their mean over the pipelines is
        what `MirroredStrategy` reads (its moving statistics are averaged on
        read, and the update is linear, so averaging after every step
        gives the same values), and every pipeline then evaluates and
        predicts with the same ones. One all-reduce per step, only when
        there are several pipelines and such variables.

        Returns:
            The assignments (graph ops), `[]` when there is nothing to do.

        Example:
        ```python
        runtime.average_state()   # in the train step, after the update
        ```
        """
        dp = self._topo.dp_size
        trainable = {id(v) for v in self.trainable_variables}
        state = [v for v in self.variables if id(v) not in trainable
                 and tf.as_dtype(v.dtype).is_floating]
        if dp == 1 or not state:
            return []
        flat = tf.concat([tf.reshape(tf.cast(v.value, tf.float32), [-1])
                          for v in state], 0)
        with tf.device("/CPU:0"):
            summed = _mpi().host_allreduce(flat, group=_STATE_GROUP,
                                           comm=self._dp_comm)
        sizes = [int(np.prod(v.shape)) for v in state]
        ops = []
        with tf.device(self._device):
            for v, part in zip(state, tf.split(summed / dp, sizes)):
                ops.append(v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype)))
        return ops

    # -- values every rank sees ----------------------------------------------------

    def all_finite(self, finite: tf.Tensor) -> tf.Tensor:
        """True on every rank when `finite` is true on every rank of the job.

        For mixed precision's loss scaling: each rank checks its own stage's
        gradients, and all must skip a step (and lower the scale) together.
        It has its own ordering group, so it may run beside `world_sum`.

        Example:
        ```python
        finite = runtime.all_finite(tf.reduce_all(tf.math.is_finite(g)))
        ```
        """
        bad = tf.reshape(tf.cast(tf.logical_not(finite), tf.float32), [1])
        with tf.device("/CPU:0"):
            total = _mpi().host_allreduce(bad, group=self._finite_group)
        return tf.equal(total[0], 0.0)

    def world_sum(self, values: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Sums float tensors over every rank of the job (one message).

        Args:
            values: float tensors of the same shapes on every rank.

        Returns:
            The sums, same shapes, as float32.

        Example:
        ```python
        total, = runtime.world_sum([local_loss])
        ```
        """
        values = [tf.cast(tf.convert_to_tensor(v), tf.float32) for v in values]
        if not values:
            return []
        flat = tf.concat([tf.reshape(v, [-1]) for v in values], 0)
        with tf.device("/CPU:0"):
            summed = _mpi().host_allreduce(flat, group=self._world_group)
        sizes = [int(np.prod(v.shape)) for v in values]
        return [tf.reshape(p, v.shape) for p, v in zip(tf.split(summed, sizes), values)]

    def gather_outputs(self, outputs: Sequence[tf.Tensor] | None) -> list[tf.Tensor]:
        """Every pipeline's outputs of a global batch, on every rank.

        Args:
            outputs: on the last stage, this pipeline's flat model outputs
                (concatenated micro-batches); `None` elsewhere.

        Returns:
            The flat model outputs of the whole global batch, in order.

        Example:
        ```python
        outs = runtime.gather_outputs(local_outputs)
        ```
        """
        result = []
        for i, key in enumerate(self._graph.outputs):
            shape, dtype = self._specs[key]
            value = (outputs[i] if outputs is not None
                     else tf.zeros([0, *shape], dtype=dtype))
            with tf.device("/CPU:0"):
                result.append(_mpi().allgather(value, group=self._world_group))
        return result


def scaled(g: Any, scale: float | tf.Tensor) -> Any:
    """`g` (a tensor or `IndexedSlices`) times `scale` (a number or a scalar tensor)."""
    if isinstance(scale, (int, float)) and scale == 1.0:
        return g
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(scale, g.values.dtype), g.indices,
                                g.dense_shape)
    return g * tf.cast(scale, g.dtype)
