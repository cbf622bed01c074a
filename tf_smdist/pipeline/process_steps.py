"""Keras steps of a `PipelineModel` whose stages run in separate processes.

`PipelineModel` hands its `train_step`, `test_step`, `predict_step`, `call`
and weight I/O to a `ProcessSteps` when the job has several processes. The
last stage computes the loss and the metrics of its pipeline's share of the
batch; every rank then adds the change of every metric variable over every
rank (one all-reduce per step), so every rank's metric variables hold the
global state: `fit` history, progress bars and callbacks see the same values
on every rank. Metrics whose state adds up over batches (means, sums,
confusion counts: every built-in metric) are supported.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.pipeline import execution
from tf_smdist.pipeline.distributed import ProcessPipeline, scaled
from tf_smdist.pipeline.execution import add_gradient
from tf_smdist.pipeline.model import InputStructureError

__all__ = ["ProcessSteps", "memory_of", "prepare_fit"]

logger = logging.getLogger(__name__)


def _rows(flat: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.shape(flat[0])[0]


class ProcessSteps:
    """A `PipelineModel`'s per-step work when each stage has its own process.

    Args:
        pipe: the `PipelineModel`.
        runtime: this process's `ProcessPipeline`.

    Example:
    ```python
    steps = ProcessSteps(pipe, runtime)   # done by PipelineModel itself
    ```
    """

    def __init__(self, pipe: Any, runtime: ProcessPipeline) -> None:
        self._pipe = pipe
        self._rt = runtime

    @property
    def runtime(self) -> ProcessPipeline:
        """This process's `ProcessPipeline`."""
        return self._rt

    # -- losses ----------------------------------------------------------------

    def _loss_fn(self, micro_y: list, micro_w: list, y: Any, sample_weight: Any,
                 shard_rows: tf.Tensor, *, training: bool):
        pipe = self._pipe
        is_sum = getattr(pipe, "_loss_is_sum", False)

        def loss_fn(i: int, outputs: list[tf.Tensor]) -> tf.Tensor:
            y_i = keras.tree.pack_sequence_as(y, micro_y[i]) if micro_y[i] else None
            w_i = (keras.tree.pack_sequence_as(sample_weight, micro_w[i])
                   if micro_w[i] else None)
            with pipe._stage_losses_apart():  # each stage adds its penalties
                loss = pipe.compute_loss(x=None, y=y_i,
                                         y_pred=pipe._pack_outputs(outputs),
                                         sample_weight=w_i, training=training)
            if is_sum:
                return loss
            # Micro-batch means weighted by their rows: the shard's mean. In
            # evaluation a micro-batch (or this pipeline's whole shard) may
            # have no rows, whose mean is 0 / 0: it counts nothing.
            rows = tf.cast(_rows(outputs), loss.dtype)
            share = tf.math.divide_no_nan(rows, tf.cast(shard_rows, loss.dtype))
            return tf.where(rows > 0, loss * share, tf.zeros_like(loss))

        return loss_fn

    def _split_targets(self, y: Any, sample_weight: Any, *, even: bool):
        m = self._rt._schedule.num_microbatches
        flat_y = keras.tree.flatten(y) if y is not None else []
        flat_w = keras.tree.flatten(sample_weight) if sample_weight is not None else []
        micro_y = self._rt.shard(flat_y, even=even) if flat_y else [[]] * m
        micro_w = self._rt.shard(flat_w, even=even) if flat_w else [[]] * m
        return micro_y, micro_w

    # -- metrics shared over the job ----------------------------------------------

    def _metric_variables(self) -> list[Any]:
        return [v for metric in self._pipe.metrics for v in metric.variables]

    def _build_metrics(self, y: Any, micro_x: list) -> None:
        """Creates the compiled metrics' and losses' state on every rank.

        Keras creates it when the loss and metrics first run, which only the
        last stage does, and only inside the update; every rank needs the
        same variables before it, to take part in the shared update.
        """
        pipe = self._pipe
        rows = _rows(micro_x[0])
        fake = [tf.zeros(tf.concat([[rows], shape], 0), dtype)
                for shape, dtype in self._rt.output_specs()]
        y_pred = pipe._pack_outputs(fake)
        _, compile_loss, compile_metrics = _compat.compiled_parts(pipe)
        for compiled in (compile_metrics, compile_loss):
            if compiled is not None and not compiled.built:
                compiled.build(y, y_pred)

    def _metric_snapshot(self, y: Any, micro_x: list) -> list[tf.Tensor]:
        """Builds the metrics and reads their state before a step runs.

        Taken before the step's loss is computed: Keras' compiled loss of a
        model with several outputs updates its per-output trackers
        (`out1_loss`) inside the loss itself (`tf.function` orders these
        reads before those updates, as they come first).
        """
        self._build_metrics(y, micro_x)
        return [tf.identity(v.value) for v in self._metric_variables()]

    def _shared_metrics(self, update: Any, before: list[tf.Tensor]) -> dict[str, Any]:
        """Runs `update()` (last stage), then adds every rank's metric changes
        since `before` (`_metric_snapshot`)."""
        variables = self._metric_variables()
        with tf.control_dependencies(before):
            if self._rt.is_last:
                update()
        after = [tf.identity(v.value) for v in variables]
        deltas = [tf.cast(a - b, tf.float32) for a, b in zip(after, before)]
        summed = self._rt.world_sum(deltas)
        for v, b, d in zip(variables, before, summed):
            v.assign(b + tf.cast(d, v.dtype))
        return self._pipe.get_metrics_result()

    # -- weight regularizers ---------------------------------------------------------

    def _penalty(self, loss_scale: Any = None, *, gradients: bool = True
                 ) -> tuple[tf.Tensor, list[Any]]:
        """This process's stages' weight penalty divided by the data-parallel
        size (summed over every rank it is the model's), and its gradients
        (`execution.weight_penalty`; `None` per variable without one)."""
        rt = self._rt
        with tf.device(rt.device):
            penalty, extra = execution.weight_penalty(
                rt.trainable_variables, loss_scale, gradients=gradients)
            if penalty is None:
                return tf.zeros([]), extra
            return penalty / rt.topology.dp_size, extra

    def _has_penalties(self) -> bool:
        """Whether any variable of the whole model has a weight regularizer
        (the same answer on every rank)."""
        return any(getattr(v, "regularizer", None) is not None
                   for v in self._pipe.wrapped_model.trainable_weights)

    def _global_penalty(self, share: tf.Tensor) -> tf.Tensor | None:
        """The whole model's penalty from every rank's `_penalty` share (one
        all-reduce, on every rank), or `None` without regularizers."""
        if not self._has_penalties():
            return None
        total, = self._rt.world_sum([share])
        return total

    # -- steps ---------------------------------------------------------------------

    def _train(self, micro_x: list, loss_fn: Any, is_sum: bool
               ) -> tuple[Any, list[tf.Tensor], list[Any], tf.Tensor]:
        """This rank's forward and backward tasks (`ProcessPipeline.train`),
        with its stages' weight penalties added to their gradients.

        Returns:
            `(outputs, losses, grads, share)`: as `ProcessPipeline.train`, the
            gradients with the penalties' added, and this rank's share of
            the model's penalty (`_penalty`).
        """
        rt = self._rt
        loss_scale = self._loss_scale()
        scale = 1.0 if is_sum else 1.0 / rt.topology.dp_size
        outs, losses, grads = rt.train(micro_x, loss_fn, gradient_scale=scale,
                                       loss_scale=loss_scale)
        self._pipe._check_added_losses()  # this rank's stages just ran
        share, extra = self._penalty(loss_scale)
        return outs, losses, [add_gradient(g, e) for g, e in zip(grads, extra)], share

    def _loss_scale(self) -> tf.Tensor | None:
        """The loss scale to seed the backward with (mixed precision), else None.

        Each rank's `LossScaleOptimizer` sees only its own stage's
        gradients; it applies or skips the step (and lowers its scale) as
        every rank's gradients together say, through one all-reduce of the
        flag, so that the stages stay in step and their scales equal.
        """
        pipe = self._pipe
        scale = pipe._loss_scale()
        if scale is not None:
            _compat.wrap_loss_scale_check(_agree_on_finite)
            _FINITE_AGREEMENTS[pipe.optimizer] = self._rt.all_finite
        return scale

    def train_step(self, data: Any) -> dict[str, Any]:
        """One training step on a global batch (every rank passes the same one)."""
        pipe, rt = self._pipe, self._rt
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        micro_x = rt.shard(pipe._flat_inputs(x))
        micro_y, micro_w = self._split_targets(y, sample_weight, even=True)
        shard_rows = tf.add_n([_rows(mx) for mx in micro_x])
        loss_fn = self._loss_fn(micro_y, micro_w, y, sample_weight, shard_rows,
                                training=True)
        is_sum = getattr(pipe, "_loss_is_sum", False)
        dp = rt.topology.dp_size
        before = self._metric_snapshot(y, micro_x)
        outs, losses, grads, share = self._train(micro_x, loss_fn, is_sum)
        penalty = self._global_penalty(share)
        self.apply_gradients(grads)

        def update() -> None:
            loss = tf.add_n(losses)
            tracker = _compat.compiled_parts(pipe)[0]
            if tracker is not None:
                # A summed loss is the batch's sum: each shard counts D times.
                value = loss * dp if is_sum else loss
                if penalty is not None:
                    value = value + tf.cast(penalty, value.dtype)
                tracker.update_state(value, sample_weight=shard_rows)
            self._update_compiled_metrics(y, sample_weight, micro_y, micro_w, outs)

        return self._shared_metrics(update, before)

    def apply_gradients(self, grads: list[Any]) -> None:
        """The optimizer step of this process's variables (`_apply`), then
        the mean of the stage's moving statistics over the pipelines
        (`ProcessPipeline.average_state`)."""
        self._apply(grads)
        self._rt.average_state()

    def _apply(self, grads: list[Any]) -> None:
        """`optimizer.apply` on this process's variables, with a
        `global_clipnorm` measured over the whole model.

        Each rank's optimizer sees only its stage's gradients, so its own
        clipping would use the stage's norm. The gradients that Keras clips
        are the step's, unscaled by a `LossScaleOptimizer`'s loss scale and,
        with `gradient_accumulation_steps`, averaged with the accumulated
        ones (Keras clips at its update steps only). Their norm over every
        stage (the data-parallel replicas hold the same) is measured here at
        every step: one all-reduce in the step's graph, in program order with
        the step's other collectives, on every rank (a stage without
        trainable variables included). The optimizer then clips with it where
        Keras clips (`_compat.clipping_with`); where it does not (steps
        between updates, or a step the loss scale skips), the norm goes
        unused.
        """
        pipe, rt = self._pipe, self._rt
        optimizer = pipe.optimizer
        inner = getattr(optimizer, "inner_optimizer", None) or optimizer
        clip = getattr(inner, "global_clipnorm", None)
        variables = rt.trainable_variables
        if not clip or clip <= 0:
            optimizer.apply(grads, variables)
            return
        clipped = list(grads)
        if inner is not optimizer:
            unscale = 1.0 / tf.convert_to_tensor(optimizer.dynamic_scale)
            clipped = [None if g is None else scaled(g, unscale) for g in clipped]
        steps = getattr(inner, "gradient_accumulation_steps", None)
        if steps:
            if variables and not inner.built:
                inner.build(variables)
            accumulated = _compat.accumulated_gradients(inner, variables)
            clipped = [None if g is None else (tf.convert_to_tensor(g) + acc) / steps
                       for g, acc in zip(clipped, accumulated)]
        scale = self._global_clip_scale(clipped, clip)
        # Keras' `v * scale`, which makes an IndexedSlices dense (so the
        # optimizer then takes its dense path, as in the plain model).
        with _compat.clipping_with(inner, lambda gs: [
                None if g is None else tf.convert_to_tensor(g) * tf.cast(scale, g.dtype)
                for g in gs]):
            optimizer.apply(grads, variables)

    def _global_clip_scale(self, grads: list[Any], clip: float) -> tf.Tensor:
        """The factor of Keras' `clip_by_global_norm`, from the norm of every
        stage's gradients (one all-reduce over the job). As Keras' norm, an
        `IndexedSlices` counts the squares of its rows (a repeated row's
        slices each), not of their dense sum."""
        rt = self._rt
        squares = tf.add_n([tf.constant(0.0)] + [
            tf.reduce_sum(tf.square(tf.cast(
                g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32)))
            for g in grads if g is not None])
        total, = rt.world_sum([squares])
        norm = tf.sqrt(total / rt.topology.dp_size)
        # Keras' formula: NaN norms give NaN gradients, as in the plain model.
        return clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)

    def test_step(self, data: Any) -> dict[str, Any]:
        """One evaluation step on a global batch (any size)."""
        pipe, rt = self._pipe, self._rt
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        micro_x = rt.shard(pipe._flat_inputs(x), even=False)
        micro_y, micro_w = self._split_targets(y, sample_weight, even=False)
        shard_rows = tf.add_n([_rows(mx) for mx in micro_x])
        loss_fn = self._loss_fn(micro_y, micro_w, y, sample_weight, shard_rows,
                                training=False)
        before = self._metric_snapshot(y, micro_x)
        outs, losses = rt.forward(micro_x, training=False, loss_fn=loss_fn)
        is_sum = getattr(pipe, "_loss_is_sum", False)
        dp = rt.topology.dp_size
        penalty = self._global_penalty(self._penalty(gradients=False)[0])

        def update() -> None:
            loss = tf.add_n(losses)
            tracker = _compat.compiled_parts(pipe)[0]
            if tracker is not None:
                value = loss * dp if is_sum else loss
                if penalty is not None:
                    value = value + tf.cast(penalty, value.dtype)
                tracker.update_state(value, sample_weight=shard_rows)
            self._update_compiled_metrics(y, sample_weight, micro_y, micro_w, outs)

        return self._shared_metrics(update, before)

    def _update_compiled_metrics(self, y: Any, sample_weight: Any, micro_y: list,
                                 micro_w: list, outs: list) -> None:
        pipe = self._pipe
        compiled = _compat.compiled_parts(pipe)[2]
        if compiled is None:
            return
        y_pred = pipe._pack_outputs(self._concat(outs))
        y_s = (keras.tree.pack_sequence_as(y, self._concat(micro_y))
               if micro_y[0] else None)
        w_s = (keras.tree.pack_sequence_as(sample_weight, self._concat(micro_w))
               if micro_w[0] else None)
        compiled.update_state(y_s, y_pred, w_s)

    @staticmethod
    def _concat(micro: list[list[tf.Tensor]]) -> list[tf.Tensor]:
        if len(micro) == 1:
            return list(micro[0])
        return [tf.concat([part[i] for part in micro], 0)
                for i in range(len(micro[0]))]

    def call(self, inputs: Any) -> Any:
        """The model's outputs for a global batch, on every rank."""
        pipe, rt = self._pipe, self._rt
        flat = pipe._flat_inputs(inputs)
        with _stopping_peers_on_error():  # also called outside predict
            micro_x = rt.shard(flat, even=False)
            outs, _ = rt.forward(micro_x, training=False)
            local = self._concat(outs) if outs is not None else None
            return pipe._pack_outputs(rt.gather_outputs(local))

    # -- weights -------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Brings every stage's current values to every rank (collective)."""
        self._rt.broadcast_weights()

    def gather_checkpoint(self) -> Any:
        """Readies a save (collective): whole weights everywhere, optimizer on rank 0.

        Returns:
            On rank 0, an optimizer built on the whole model's trainable
            variables holding every stage's optimizer state (`None` without
            a compiled optimizer); `None` on other ranks.
        """
        from tf_smdist.pipeline import checkpoint  # noqa: PLC0415

        self.sync_weights()
        pipe = self._pipe
        return checkpoint.gather_optimizer(
            self._rt, checkpoint.built_optimizer(pipe), pipe.wrapped_model)

    def load_checkpoint(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """Loads a weight file on rank 0 and hands it to every rank (collective).

        Every rank takes rank 0's weights, and its own stage's optimizer
        state when the file holds optimizer state.
        """
        from tf_smdist import _mpi_ops  # noqa: PLC0415
        from tf_smdist.pipeline import checkpoint  # noqa: PLC0415

        pipe = self._pipe
        optimizer = checkpoint.built_optimizer(pipe)
        # Rank 0 first holds the current state, so what the file lacks (or
        # Keras skips: another optimizer's state) stays as it is.
        full = checkpoint.gather_optimizer(self._rt, optimizer, pipe.wrapped_model)
        failure, error = b"", None
        if self._rt.topology.rank == 0:
            try:
                if full is not None and not checkpoint.has_optimizer_state(filepath):
                    full = None
                with checkpoint.attached_optimizer(pipe.wrapped_model, full):
                    pipe.wrapped_model.load_weights(filepath, *args, **kwargs)
            except Exception as e:  # every rank must learn of it, not wait
                error = e
                failure = (("1" if isinstance(e, OSError) else "0")
                           + f"{type(e).__name__}: {e}").encode()
        # Rank 0 alone reads the file (maybe large) while the others wait.
        failure = _mpi_ops.broadcast_bytes(failure, root=0, timeout=_ALONE_WAIT_S)
        if error is not None:
            raise error
        if failure:
            message = (f"Rank 0 could not load the weights. Received: "
                       f"filepath={str(filepath)!r}, {failure[1:].decode()}. "
                       "Make the file readable by rank 0.")
            if failure.startswith(b"1"):
                raise OSError(message)  # as on rank 0 (BackupAndRestore retries)
            raise RuntimeError(message)
        self._rt.broadcast_weights(root=0)
        checkpoint.scatter_optimizer(self._rt, optimizer, full)

    def compute_gradients(
        self, x: Any, y: Any = None, sample_weight: Any = None
    ) -> tuple[tf.Tensor, None, list[tf.Tensor]]:
        """The custom-loop step: global loss, no outputs, this rank's gradients.

        The gradients (of `local_trainable_variables`) are already averaged
        over the data-parallel group; the loss is the global batch's, equal
        on every rank.
        """
        flat = self._pipe._flat_inputs(x)
        with _stopping_peers_on_error():  # in the user's own tf.function
            return self._compute_gradients(flat, y, sample_weight)

    def _compute_gradients(
        self, flat: list[Any], y: Any, sample_weight: Any
    ) -> tuple[tf.Tensor, None, list[tf.Tensor]]:
        pipe, rt = self._pipe, self._rt
        micro_x = rt.shard(flat)
        micro_y, micro_w = self._split_targets(y, sample_weight, even=True)
        shard_rows = tf.add_n([_rows(mx) for mx in micro_x])
        loss_fn = self._loss_fn(micro_y, micro_w, y, sample_weight, shard_rows,
                                training=True)
        is_sum = getattr(pipe, "_loss_is_sum", False)
        dp = rt.topology.dp_size
        _, losses, grads, share = self._train(micro_x, loss_fn, is_sum)
        local = tf.add_n(losses) if losses else tf.zeros([])
        if not is_sum:
            local = local / dp
        loss, = rt.world_sum([local + tf.cast(share, local.dtype)])
        return loss, None, grads

    def report(self) -> str:
        """One line per stage: layers, parameters, owner ranks."""
        rt = self._rt
        topo = rt.topology
        lines = [
            f"  {topo.world_size} processes: {topo.dp_size} pipeline(s) x "
            f"{topo.stage_size} stages, placement {topo.placement!r}; this "
            f"process: rank {topo.rank}, stage {topo.stage_rank}, pipeline "
            f"{topo.dp_rank}, device {rt.device}"
        ]
        for s in range(rt._schedule.num_stages):
            layers = rt.stage_layers(s)
            params = sum(int(np.prod(v.shape)) for layer in layers
                         for v in layer.weights)
            device = rt._schedule.device_of(s)
            ranks = [topo.rank_of(device, d) for d in range(topo.dp_size)]
            names = [layer.name for layer in layers] or ["(no layers)"]
            lines.append(
                f"  stage {s} on ranks {ranks}: {len(layers)} layers "
                f"({names[0]} .. {names[-1]}), {params} parameters, receives "
                f"{len(rt.transfer_plan.incoming(s))} tensor(s)"
            )
        return "\n".join(lines)


def _nbytes(variables: Sequence[Any]) -> int:
    return int(sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
                   for v in variables))


def memory_of(pipe: Any, variables: Sequence[Any],
              trainable: Sequence[Any]) -> dict[str, int]:
    """Bytes of `variables`, their gradients and the optimizer state held.

    Example:
    >>> memory_of(pipe, pipe.weights, pipe.trainable_variables)  # doctest: +SKIP
    {'variables': 1024, 'gradients': 1024, 'optimizer': 2048, 'model': 1024}
    """
    optimizer = getattr(pipe, "optimizer", None)
    slots = list(getattr(optimizer, "variables", None) or [])
    return {
        "variables": _nbytes(variables),
        "gradients": _nbytes(trainable),
        "optimizer": _nbytes([v for v in slots if len(v.shape) > 0]),
        "model": _nbytes(pipe.wrapped_model.weights),
    }


def _check_batches(pipe: Any, args: tuple, kwargs: dict) -> None:
    x = args[0] if args else kwargs.get("x")
    unit = pipe.microbatches * pipe.dp_size
    if isinstance(x, (list, tuple, dict)) and x:
        x = keras.tree.flatten(x)[0]  # several inputs: one batch size
    size = getattr(x, "shape", None)
    if size is not None and len(size) and size[0] is not None:
        batch = kwargs.get("batch_size") or 32
        samples = int(size[0])
        split = kwargs.get("validation_split") or 0.0
        where = f"{samples} samples"
        if split and not kwargs.get("validation_data"):
            # Keras trains on the first floor(n * (1 - split)) samples.
            samples = int(math.floor(samples * (1.0 - split)))
            where = (f"{samples} training samples of {int(size[0])} with "
                     f"validation_split={split}")
        rest = samples % batch
        for label, rows in (("batch_size", batch), ("last batch", rest)):
            if rows % unit:
                raise ValueError(
                    "Every global batch must be a multiple of the number of "
                    "micro-batches times the number of pipelines. Received: "
                    f"{label} {rows} ({where}, batch_size="
                    f"{batch}) with microbatches={pipe.microbatches} and "
                    f"{pipe.dp_size} pipeline(s). Use a batch size and a "
                    f"sample count divisible by {unit}."
                )
    elif isinstance(x, tf.data.Dataset):
        spec = keras.tree.flatten(x.element_spec)[0]
        rows = spec.shape[0] if spec.shape.rank else None
        if rows is not None and rows % unit:
            raise ValueError(
                "Every global batch must be a multiple of the number of "
                "micro-batches times the number of pipelines. Received: "
                f"dataset batches of {rows} with microbatches="
                f"{pipe.microbatches} and {pipe.dp_size} pipeline(s). Batch "
                f"the dataset by a multiple of {unit}."
            )


# A pipeline's LossScaleOptimizer -> its runtime's `all_finite`.
_FINITE_AGREEMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _agree_on_finite(loss_scale_optimizer: Any, finite: tf.Tensor) -> tf.Tensor:
    """A pipeline's `LossScaleOptimizer`: finite only if every rank's gradients are."""
    agree = _FINITE_AGREEMENTS.get(loss_scale_optimizer)
    return finite if agree is None else agree(finite)


def _agree_on_shuffling(args: tuple, kwargs: dict) -> None:
    """Makes every rank's `fit` shuffle arrays into the same order.

    Keras shuffles arrays (and a `PyDataset`'s batches) with TensorFlow's
    random ops when `shuffle=True`, its default. Each stage process reads its
    own part of each global batch (the inputs on the first stage, the targets
    on the last), so ranks shuffling apart would train on inputs paired with
    other samples' targets. Every rank therefore sets TensorFlow's global
    seed to one rank 0 draws afresh for each `fit`. A `tf.data.Dataset` is
    the script's to shuffle alike (a fixed seed); `shuffle=False` changes
    nothing.
    """
    from tf_smdist.data_parallel import cluster  # noqa: PLC0415

    x = args[0] if args else kwargs.get("x")
    if not kwargs.get("shuffle", True) or isinstance(x, tf.data.Dataset):
        return
    cluster.agree_on_random_seed(keep_own=False)


def measure_bandwidth(pipe: Any, *, nbytes: int = 4 << 20, repeats: int = 3) -> float:
    """Bytes per second between stages 0 and 1, the same value on every rank.

    Stage 0 sends `nbytes` to stage 1 of the same pipeline `repeats` times
    (each answered by one byte); the median is taken, and the slowest
    pipeline's value is agreed on by every rank.

    Example:
    >>> measure_bandwidth(pipe)  # doctest: +SKIP
    2.1e9
    """
    from tf_smdist import _mpi_ops
    from tf_smdist.data_parallel import cluster
    from tf_smdist.pipeline.routing import MAX_TAG

    rt = pipe._process.runtime
    topo = rt.topology
    bandwidth = float("inf")
    if topo.stage_size > 1 and topo.stage_rank in (0, 1):
        payload = bytes(nbytes)
        comm = rt.pipeline_comm
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            if topo.stage_rank == 0:
                _mpi_ops.send_bytes(payload, peer=1, tag=MAX_TAG, comm=comm)
                _mpi_ops.recv_bytes(1, peer=1, tag=MAX_TAG, comm=comm)
            else:
                _mpi_ops.recv_bytes(nbytes, peer=0, tag=MAX_TAG, comm=comm)
                _mpi_ops.send_bytes(b"\0", peer=0, tag=MAX_TAG, comm=comm)
            times.append(time.perf_counter() - start)
        bandwidth = nbytes / statistics.median(times)
    agreed = cluster.allreduce_numpy(np.array([bandwidth]), reduction="min")
    return float(agreed[0])


_PROFILE_FAILED = "\0profile failed: "
# Seconds the other ranks wait while rank 0 alone reads a weight file, and
# for its profile beyond 10 x the profile's time budget: longer than the
# watchdog's usual deadline, as that work may be (a dead or failed rank 0
# still fails them within the usual deadline).
_ALONE_WAIT_S = 600.0


def _profiled_already(pipe: Any, callback: Any) -> bool:
    """Whether `callback` profiled this model in an earlier `fit` (it then
    does nothing, as in one process)."""
    target = callback.target_model or pipe.profiled_model
    return callback.profile is not None and callback.profiled_model is target


def agreed_profile(pipe: Any, callback: Any) -> Any:
    """Rank 0 profiles as `callback` would; every rank gets rank 0's profile.

    The callback is not changed apart from its results: a copy with the
    same options profiles the wrapped model on rank 0 (nested models whole,
    unless the callback sets `expand_nested`), and every rank's callback then
    holds the profile in `profile` and calls its `on_profile` with it. A
    callback that already profiled this model (an earlier `fit`) is not run
    again (as in one process), and `None` is returned. The other ranks wait
    for rank 0's profile past the watchdog's usual deadline (up to 600 s +
    10 x the profile's `time_budget`) while rank 0 is alive; if profiling
    fails on rank 0, every rank raises.

    Args:
        pipe: the `PipelineModel` (across processes).
        callback: the user's `ProfilingCallback`.

    Returns:
        The new `Profile`, the same on every rank, or `None`.

    Example:
    >>> agreed_profile(pipe, smd.ProfilingCallback())  # doctest: +SKIP
    Profile of ...
    """
    from tf_smdist import _mpi_ops
    from tf_smdist.pipeline.callback import ProfilingCallback
    from tf_smdist.pipeline.profile import Profile

    if _profiled_already(pipe, callback):
        return None
    target = callback.target_model or pipe.profiled_model
    text, error = "", None
    if pipe.topology.rank == 0:
        options = {"expand_nested": False, **callback.profile_kwargs}
        try:
            probe = ProfilingCallback(
                sample_batch=callback.sample_batch, batch_size=callback.batch_size,
                path=callback.path, model=callback.target_model, **options)
            probe.set_model(pipe)
            text = probe.run_profile().to_json()
        except Exception as e:  # every rank must learn of it, not wait
            error = e
            text = _PROFILE_FAILED + f"{type(e).__name__}: {e}"
    # The other ranks wait while rank 0 profiles, which may take longer than
    # the watchdog's usual deadline (up to `time_budget` seconds of timed
    # calls, and tracing every layer): wait on while rank 0 is alive.
    budget = float(callback.profile_kwargs.get("time_budget", 60.0))
    text = _mpi_ops.broadcast_bytes(
        text.encode(), root=0, timeout=_ALONE_WAIT_S + 10.0 * budget).decode()
    if error is not None:
        raise error
    if text.startswith(_PROFILE_FAILED):
        raise RuntimeError(
            "Rank 0 could not profile the model for partition='auto' (or the "
            f"ProfilingCallback), so no rank can partition it. Received: "
            f"{text[len(_PROFILE_FAILED):]}. Pass an explicit partition, or fix "
            "the error above on rank 0.")
    profile = Profile.from_json(text)
    callback.set_model(pipe)
    callback.record_profile(profile, target)
    return profile


@contextlib.contextmanager
def finalizing_local_variables(pipe: Any) -> Iterator[None]:
    """Lets `fit`'s last call to the optimizer finalize this rank's variables.

    Keras' `fit` ends with `optimizer.finalize_variable_values(
    model.trainable_weights)`: with `use_ema=True` the moving averages then
    replace the variables, matched by position. Each rank's optimizer holds
    the averages of its own stages' variables only, so for the duration of
    `fit` that call finalizes those (`ProcessPipeline.trainable_variables`,
    the list the optimizer was built on); `get_weights` then assembles the
    averaged model.

    Example:
    >>> with finalizing_local_variables(pipe):  # doctest: +SKIP
    ...     keras.Model.fit(pipe, x, y)
    """
    optimizer = getattr(pipe, "optimizer", None)
    if optimizer is None:
        yield
        return
    finalize = optimizer.finalize_variable_values
    local = pipe._process.runtime.trainable_variables
    optimizer.finalize_variable_values = lambda var_list: finalize(local)
    try:
        yield
    finally:
        del optimizer.finalize_variable_values  # the class's method again


def _restored_steps(pipe: Any) -> bool:
    """Whether any rank's optimizer has steps behind it (agreed: one all-reduce)."""
    from tf_smdist.data_parallel import cluster

    optimizer = getattr(pipe, "optimizer", None)
    steps = (int(optimizer.iterations.numpy())
             if optimizer is not None and optimizer.built else 0)
    flag = cluster.allreduce_numpy(np.array([float(steps > 0)], np.float32),
                                   reduction="max")
    return bool(flag[0] > 0)


def prepare_fit(pipe: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Checks `fit`'s arguments and readies its callbacks across processes.

    A `ProfilingCallback` (or `partition="auto"` still pending) profiles the
    model on rank 0 before the first step, every rank partitions from rank
    0's profile and the measured point-to-point bandwidth
    (`measure_bandwidth`), and training starts on that partition. On ranks
    other than 0, `BackupAndRestore` only takes part in gathering the weights
    and the optimizer state (rank 0 writes the backup); every rank restores
    from it (`PipelineModel.load_weights`, collective).

    Args:
        pipe: the `PipelineModel` (across processes).
        args: `fit`'s positional arguments.
        kwargs: `fit`'s keyword arguments.

    Returns:
        `(args, kwargs)` for `keras.Model.fit`.

    Example:
    >>> args, kwargs = prepare_fit(pipe, (x, y), {"batch_size": 64})  # doctest: +SKIP
    """
    from tf_smdist.pipeline.callback import ProfilingCallback

    if pipe.run_eagerly:
        raise ValueError(
            "A pipeline across processes runs each step as a graph (its "
            "messages run concurrently). Received: run_eagerly=True. Compile "
            "with run_eagerly=False."
        )
    _check_batches(pipe, args, kwargs)
    _agree_on_shuffling(args, kwargs)
    callbacks = list(kwargs.get("callbacks") or [])
    profilers = [c for c in callbacks if isinstance(c, ProfilingCallback)]
    if not profilers and pipe._pending_auto:
        profilers = [ProfilingCallback(batch_size=kwargs.get("batch_size") or 32)]
    profilers = [c for c in profilers if not _profiled_already(pipe, c)]
    if profilers and _restored_steps(pipe):
        # Loaded optimizer state lives with its variables' processes; a new
        # partition would have to move it between them, which it cannot.
        warnings.warn(
            "The pipeline keeps its current partition: its optimizer already "
            f"holds the state of {int(pipe.optimizer.iterations.numpy())} steps "
            "(loaded weights), which moving layers between processes would "
            "lose. Received: partition='auto' or a ProfilingCallback after "
            "load_weights. Partition first (an explicit partition, or "
            "pipe.auto_partition(x)), then load the weights.",
            stacklevel=3,
        )
        pipe._pending_auto = False
        profilers = []
    for callback in profilers:
        profile = agreed_profile(pipe, callback)
        if profile is None:
            continue
        if "bandwidth" not in pipe._partition_options:
            # The measured point-to-point bandwidth prices the transfers.
            pipe._partition_options["bandwidth"] = measure_bandwidth(pipe)
        pipe.partition_from_profile(profile)
    callbacks = [c for c in callbacks if not isinstance(c, ProfilingCallback)]
    if any(isinstance(cb, keras.callbacks.BackupAndRestore) for cb in callbacks):
        # Every rank decides from the files whether to restore (a collective
        # load): wait until rank 0 has finished an earlier fit, which may
        # delete its backup at the end.
        from tf_smdist.data_parallel import cluster

        cluster.allreduce_numpy(np.zeros(1, np.float32))
    if pipe.topology.rank != 0:
        for cb in callbacks:
            if isinstance(cb, keras.callbacks.BackupAndRestore):
                # Here it only takes part in gathering the weights and
                # the optimizer state (rank 0 writes).
                _compat.stop_checkpoint_writes(cb, pipe._process.gather_checkpoint)
                cb.delete_checkpoint = False
    kwargs["callbacks"] = callbacks
    return args, kwargs


def _stop_communication(error: BaseException) -> None:
    """Stops this rank's communication after `error` out of a pipeline step.

    Inside a step a Python error may be this rank's alone: the last stage's
    loss given targets of the wrong shape (a build error), one stage's op
    failing at run time (an `Embedding` index out of range). The other
    stages would wait for this rank's messages until the watchdog's timeout;
    once it stops, their receives from it fail about half a second later,
    naming it. The communicator cannot be used afterwards (the job must
    restart). The end of the data, and inputs of the wrong structure (the
    same error on every rank, before any message), pass untouched.
    """
    if isinstance(error, (StopIteration, tf.errors.OutOfRangeError,
                          InputStructureError)):
        return
    from tf_smdist import _mpi_ops

    _mpi_ops.abort(f"{type(error).__name__} in its pipeline step: {error}")


def stopping_peers_on_error(function: Any) -> Any:
    """`function` (Keras' train, test or predict function), stopping this
    rank's communication when it raises (`_stop_communication`)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with _stopping_peers_on_error():
            return function(*args, **kwargs)

    return run


@contextlib.contextmanager
def _stopping_peers_on_error() -> Iterator[None]:
    """`stopping_peers_on_error` for a step built outside Keras' functions."""
    try:
        yield
    except Exception as e:
        _stop_communication(e)
        raise
