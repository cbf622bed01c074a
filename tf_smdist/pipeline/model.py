"""`PipelineModel`: a Keras model trained as a micro-batched pipeline."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.pipeline import execution
from tf_smdist.pipeline import schedule as schedules
from tf_smdist.pipeline.graph import LayerGraph, output_structure
from tf_smdist.pipeline.stages import (
    Stage,
    pipeline_graph,
    place_variables,
    split_model,
    stage_layer_names,
)
from tf_smdist.pipeline.topology import PLACEMENTS, Topology

__all__ = ["PipelineModel"]

logger = logging.getLogger(__name__)

_MEAN = "sum_over_batch_size"


def _default_devices(count: int) -> list[str]:
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) >= count:
        return [d.name for d in gpus[:count]]
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) >= count:
        return [d.name for d in cpus[:count]]
    raise ValueError(
        "There are fewer devices than pipeline stages. Received: "
        f"num_stages={count} with {len(gpus)} GPU(s) and {len(cpus)} logical "
        "CPU device(s). Pass `devices=[...]` (remote workers' devices work), "
        "use fewer stages, or call `smd.configure_cpu_devices(n)` at start-up."
    )


def _even_partition(order: list[str], count: int) -> list[int]:
    base, extra = divmod(len(order), count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def refuse_added_losses(model: keras.Model) -> None:
    """Raises if a layer of `model` holds a loss from `add_loss`.

    `model.losses` holds the weight regularizers' penalties, which each stage
    adds itself (`execution.weight_penalty`), and the losses that layers
    added in their last `call`: those depend on that call's inputs, and only
    the loss's gradient travels back through a pipeline. Checked when the
    pipeline is built (a model called before) and after its first step.

    Raises:
        NotImplementedError: a layer added a loss in `call`.
    """
    regularized = sum(getattr(v, "regularizer", None) is not None
                      for v in model.trainable_weights)
    with tf.init_scope():  # the penalties it recomputes stay out of the step's graph
        added = len(model.losses) - regularized
    if added > 0:
        raise NotImplementedError(
            "PipelineModel does not support losses added with `add_loss`: the "
            "loss is computed on the last stage, and a loss of another stage's "
            "layer would not reach its gradients. Received: a model with "
            f"{added} such loss(es). Add the term to the loss instead. (Weight "
            "regularizers, such as `kernel_regularizer`, are supported.)"
        )


def _loss_reductions(loss: Any) -> list[str]:
    if isinstance(loss, dict):
        items = list(loss.values())
    elif isinstance(loss, (list, tuple)):
        items = list(loss)
    else:
        items = [loss]
    return [getattr(item, "reduction", _MEAN) or _MEAN for item in items]


class InputStructureError(ValueError):
    """Inputs that do not match the model's: raised alike on every rank, before
    any message, so it does not stop the ranks' communication."""


class PipelineModel(keras.Model):
    """A Keras model split into stages on several devices and run as a pipeline.

    The wrapped Sequential or functional model is cut into `num_stages`
    stages of consecutive layers (every tensor live across a cut, skip
    connections included, is carried to the next stage). Each stage's layers
    and variables live on its device. A training batch is cut into
    `microbatches` equal micro-batches that flow through the stages in the
    order of an explicit schedule (`"gpipe"`, `"1f1b"` or `"interleaved"`);
    every device runs its forward and backward tasks in that order, chained
    with control dependencies. Gradients are summed over the micro-batches and
    the optimizer steps once per batch.

    Loss semantics: with a mean-reduced loss (Keras' default,
    `"sum_over_batch_size"`) micro-batch `m` contributes `loss_m / M`, so the
    batch loss, its gradients, and the metrics equal the plain model's on the
    whole batch (up to float rounding). With `reduction="sum"` losses add up
    unscaled. Other reductions are refused.

    BatchNormalization inside a stage normalises each micro-batch with its
    own statistics (batch size `B / M`) and updates its moving averages once
    per micro-batch, as in GPipe; results then differ from the plain model's,
    and a warning says so.

    Args:
        model: a built Sequential or functional Keras model. Its layers and
            variables are used in place (not copied).
        num_stages: the number of devices `K`.
        microbatches: the number of micro-batches `M` per batch.
        schedule: `"gpipe"`, `"1f1b"` or `"interleaved"`. Defaults to
            `"1f1b"`.
        devices: one TensorFlow device per stage (`"/GPU:0"`, `"/CPU:1"`,
            `"/job:worker/task:1/device:CPU:0"`). Defaults to `None`: the
            first `K` GPUs, else the first `K` logical CPU devices.
        partition: `"auto"`, a `Partition`, stage sizes (layers per stage in
            `layer_order(model)`), or one list of layer names per stage; with
            `"interleaved"`, `K * virtual_stages` entries. Defaults to
            `"auto"`: an equal split by layer count until the first batch
            of `fit` (or `auto_partition`) profiles the model and
            `smd.partition` chooses the split (see `ProfilingCallback`).
        virtual_stages: stages per device for `"interleaved"`. Defaults to `2`.
        recompute: drop each stage's intermediate activations after its
            forward and recompute them in its backward. Defaults to `False`.
        defer_weight_gradients: compute the weight gradients of each
            stage's dense products (`x @ kernel`, as in `Dense`) as two
            products per step instead of one per micro-batch inside the
            backward tasks: one over the rows of every micro-batch but the
            last, run while the stage waits for its last output gradient,
            and one for the last, after its last backward task (the
            backward tasks that the previous stage waits for get shorter,
            and the products larger). Costs memory: those layers' inputs
            and output gradients of every micro-batch stay alive until the
            stage's last backward task (as in GPipe). Ignored with
            `recompute`. Defaults to `False`.
        partition_options: keyword arguments for `smd.partition` when the
            partition is chosen automatically (`optimize`,
            `memory_capacity`, `bandwidth`, ...). Defaults to `None`.
        placement: in a job of several processes, how ranks map to
            pipelines: `"cluster"` (a pipeline on adjacent ranks) or
            `"spread"` (a data-parallel group on adjacent ranks). Defaults to
            `"cluster"`.
        transfer_compression: in a job of several processes, `None`,
            `"fp16"` or `"bf16"`: the dtype floating activations and their
            gradients travel in between stages. Defaults to `None`.
        bucket_cap_mb: in a job of several processes, the fusion-bucket cap
            of each stage's gradient all-reduce over its data-parallel group.
            Defaults to `25.0`.
        name: the model's name. Defaults to `None`.

    In a job of `N` processes (started by `python -m tf_smdist.launch`,
    `mpirun` or SLURM) every process runs the same script, and each runs one
    stage (with `"interleaved"`, its `virtual_stages` stages) on its local
    device: `N / num_stages` pipelines train as data-parallel replicas, each
    on its contiguous share of every global batch. See
    `stage_rank`, `dp_rank`, `pipeline_ranks` and `dp_group_ranks`.

    Example:
    ```python
    import keras
    import tf_smdist as smd

    smd.configure_cpu_devices(2)
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu")(inputs)
    outputs = keras.layers.Dense(1)(x)
    pipe = smd.PipelineModel(
        keras.Model(inputs, outputs), num_stages=2, microbatches=4,
        partition=[1, 1],
    )
    pipe.compile(optimizer="sgd", loss="mse")
    pipe.fit(x_train, y_train, batch_size=32, epochs=2)
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        num_stages: int,
        microbatches: int,
        schedule: str = "1f1b",
        devices: Sequence[str] | None = None,
        partition: Any = "auto",
        virtual_stages: int = 2,
        recompute: bool = False,
        defer_weight_gradients: bool = False,
        partition_options: dict[str, Any] | None = None,
        placement: str = "cluster",
        transfer_compression: str | None = None,
        bucket_cap_mb: float = 25.0,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or f"pipeline_{model.name}")
        for arg, value in (("num_stages", num_stages), ("microbatches", microbatches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"`{arg}` must be a positive integer. Received: {arg}={value!r}"
                )
        if schedule not in schedules.SCHEDULES:
            raise ValueError(
                f"Unknown pipeline schedule. Received: schedule={schedule!r}. "
                f"Use one of {list(schedules.SCHEDULES)}."
            )
        if placement not in PLACEMENTS:
            raise ValueError(
                f"Unknown placement. Received: placement={placement!r}. Use "
                f"one of {list(PLACEMENTS)}."
            )
        if transfer_compression not in (None, "fp16", "bf16"):
            raise ValueError(
                "Unknown transfer compression. Received: "
                f"transfer_compression={transfer_compression!r}. Use None, "
                "'fp16' or 'bf16'."
            )
        self._topology: Topology | None = None
        self._process: Any = None
        self._transfer_compression = transfer_compression
        self._bucket_cap_mb = bucket_cap_mb
        from tf_smdist.data_parallel import cluster

        if cluster.is_multiprocess():
            rank, world = cluster.env_rank_and_size()
            # Checked before any communication.
            self._topology = Topology(
                world, num_stages, placement=placement, rank=rank
            )
            cluster.initialize()
            devices = ["/CPU:0"] * num_stages  # each process runs its own
        self.wrapped_model = model
        if getattr(model, "output_names", None):
            # Keras' compile names per-output losses and metrics by these
            # ("out1_loss"), and matches dict losses and targets to them.
            self.output_names = list(model.output_names)
        self._num_devices = num_stages
        self._microbatches = microbatches
        self._schedule_name = schedule
        self._virtual = virtual_stages if schedule == "interleaved" else 1
        self._recompute = bool(recompute)
        self._defer_weights = bool(defer_weight_gradients)
        self._partition_options = dict(partition_options or {})
        if devices is None:
            devices = _default_devices(num_stages)
        devices = list(devices)
        if len(devices) < num_stages:
            raise ValueError(
                "There are fewer devices than pipeline stages. Received: "
                f"num_stages={num_stages} with devices={devices}. Pass one "
                "device per stage or use fewer stages."
            )
        self._devices = devices[:num_stages]
        self._schedule = schedules.make_schedule(
            schedule, num_stages, microbatches, virtual_stages=self._virtual
        )
        self._check_layers(model)
        # The one graph walker's view of the model; nested models whole
        # unless a partition names their layers (see `_graph_for`).
        self._graph = pipeline_graph(model)
        self._pending_auto = isinstance(partition, str)
        if isinstance(partition, str):
            if partition != "auto":
                raise ValueError(
                    "`partition` must be 'auto', a Partition, stage sizes or "
                    f"layer-name lists. Received: partition={partition!r}"
                )
            partition = _even_partition(self._graph.names, self._schedule.num_stages)
        self._stages: tuple[Stage, ...] = ()
        self._partition: Any = None
        # Moved variables by the keys optimizers knew them by before
        # (weight-decay exclusions set before the move use those).
        self._moved_keys: dict[Any, Any] = {}
        self.repartition(partition)
        self.built = True

    # -- partition ------------------------------------------------------

    def _check_layers(self, model: keras.Model) -> None:
        norms = []
        for layer in _compat.all_sublayers(model):
            if getattr(layer, "activity_regularizer", None) is not None:
                raise NotImplementedError(
                    "PipelineModel does not support activity regularizers: the "
                    "penalty of another stage's outputs would not reach its "
                    f"gradients. Received: layer {layer.name!r} with an "
                    "activity_regularizer. Add the penalty to the loss instead. "
                    "(Weight regularizers, such as `kernel_regularizer`, are "
                    "supported.)"
                )
            if isinstance(layer, keras.layers.BatchNormalization):
                if self._recompute:
                    raise ValueError(
                        "recompute=True would update BatchNormalization's "
                        "moving statistics twice per micro-batch. Received: "
                        f"layer {layer.name!r} with recompute=True. Use "
                        "recompute=False or a LayerNormalization."
                    )
                norms.append(layer.name)
        refuse_added_losses(model)
        topology = getattr(self, "_topology", None)
        pipelines = topology.dp_size if topology is not None else 1
        if norms and self._microbatches * pipelines > 1:
            shown = ", ".join(repr(n) for n in norms[:3])
            more = f" and {len(norms) - 3} more" if len(norms) > 3 else ""
            parts = (f"{self._microbatches} micro-batches" if pipelines == 1 else
                     f"{pipelines} pipelines x {self._microbatches} micro-batch(es)")
            warnings.warn(
                f"{len(norms)} BatchNormalization layer(s) ({shown}{more}): in "
                "a pipeline each normalises every micro-batch of size "
                f"batch_size / {self._microbatches * pipelines} ({parts}) with "
                "its own statistics and updates its moving averages once per "
                "micro-batch, so results differ from the unpipelined model. "
                "Use LayerNormalization, or one micro-batch and one pipeline, "
                "to match it exactly.",
                stacklevel=3,
            )

    def repartition(self, partition: Any) -> None:
        """Re-cuts the model into stages and moves variables to their devices.

        Args:
            partition: a `Partition`, stage sizes, or layer-name lists (see
                the class docstring).

        Example:
        ```python
        pipe.repartition([3, 1])   # 3 layers on device 0, 1 on device 1
        ```
        """
        graph = self._graph_for(partition)
        names = stage_layer_names(graph, partition, self._schedule.num_stages,
                                  self._virtual)
        if self._topology is not None:
            self._repartition_processes(names, graph)
            self._partition = partition if hasattr(partition, "report") else None
            return
        devices = [
            self._devices[self._schedule.device_of(s)]
            for s in range(self._schedule.num_stages)
        ]
        stages = split_model(graph, names, devices)
        for stage in stages:
            self._moved_keys.update(place_variables(stage))
        self._stages = tuple(stages)
        self._partition = partition if hasattr(partition, "report") else None
        self._move_optimizer_state()
        self._keep_weight_decay_exclusions()
        # Trace new functions around the new stages; `fit` calls
        # `self.train_function` each step, so replace it while it runs.
        if self.train_function is not None:
            self.make_train_function(force=True)
        self.test_function = None
        self.predict_function = None
        logger.info("Pipeline partition:\n%s", self.partition_report())

    def _repartition_processes(
        self, names: list[list[str]], graph: LayerGraph
    ) -> None:
        from tf_smdist.pipeline.distributed import ProcessPipeline
        from tf_smdist.pipeline.process_steps import ProcessSteps

        if self._process is not None:
            self._process.sync_weights()  # the new owners need current values
        runtime = ProcessPipeline(
            self.wrapped_model,
            names,
            self._schedule,
            self._topology,
            compression=self._transfer_compression,
            recompute=self._recompute,
            defer_weight_gradients=self._defer_weights,
            bucket_cap_mb=self._bucket_cap_mb,
            graph=graph,
        )
        self._process = ProcessSteps(self, runtime)
        self._stages = ()
        self._rebuild_optimizer()
        if self.train_function is not None:
            self.make_train_function(force=True)
        self.test_function = None
        self.predict_function = None
        logger.info("Pipeline partition:\n%s", self.partition_report())

    def _rebuild_optimizer(self) -> None:
        """Gives the optimizer state for this process's variables only."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None or self._process is None:
            return
        if optimizer.built:
            if int(optimizer.iterations.numpy()) > 0:
                raise ValueError(
                    "A pipeline across processes cannot move layers between "
                    "processes once training has started. Received: a new "
                    "partition after "
                    f"{int(optimizer.iterations.numpy())} optimizer steps. "
                    "Partition before training (`auto_partition`, or fit's "
                    "first batch)."
                )
            configured = optimizer
            optimizer = type(optimizer).from_config(optimizer.get_config())
            _compat.keep_weight_decay_exclusions(
                optimizer, configured, self._moved_keys)
            self.optimizer = optimizer
        optimizer.build(self._process.runtime.trainable_variables)

    # -- processes --------------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        """This process's place in a multi-process job (`None` in one process)."""
        return self._topology

    @property
    def stage_rank(self) -> int:
        """This process's pipeline stage (0 in one process)."""
        return self._topology.stage_rank if self._topology else 0

    @property
    def stage_size(self) -> int:
        """The number of pipeline stages (processes per pipeline)."""
        return self._num_devices

    @property
    def dp_rank(self) -> int:
        """This process's pipeline: its data-parallel rank (0 in one process)."""
        return self._topology.dp_rank if self._topology else 0

    @property
    def dp_size(self) -> int:
        """The number of pipelines trained side by side (1 in one process)."""
        return self._topology.dp_size if self._topology else 1

    @property
    def pipeline_ranks(self) -> list[int]:
        """The world ranks of this process's pipeline, in stage order."""
        return self._topology.pipeline_ranks if self._topology else [0]

    @property
    def dp_group_ranks(self) -> list[int]:
        """The world ranks of this process's data-parallel group."""
        return self._topology.dp_group_ranks if self._topology else [0]

    @property
    def local_trainable_variables(self) -> list[Any]:
        """The trainable variables this process trains (all in one process).

        Example:
        ```python
        loss, _, grads = pipe.compute_gradients(x, y)  # one per variable here
        pipe.apply_gradients(grads)  # updates local_trainable_variables
        ```
        """
        if self._process is not None:
            return self._process.runtime.trainable_variables
        return self.trainable_variables

    def memory_report(self) -> dict[str, int]:
        """Bytes of variables, gradients and optimizer state this process holds.

        Returns:
            `variables`, `gradients` and `optimizer` bytes of this process's
            stage(s), and `model`, the whole model's variable bytes (every
            process builds the whole model in host memory first).

        Example:
        ```python
        print(pipe.memory_report())
        ```
        """
        from tf_smdist.pipeline.process_steps import memory_of

        if self._process is not None:
            runtime = self._process.runtime
            return memory_of(self, runtime.variables, runtime.trainable_variables)
        return memory_of(self, self.weights, self.trainable_variables)

    def _graph_for(self, partition: Any) -> LayerGraph:
        """The graph whose node names `partition` uses.

        Stage sizes and names count nested models as one node each; a
        partition made from a profile that expanded nested models
        (`ProfilingCallback`'s default) names their inner layers instead
        (`outer/inner`), and the stages are then cut from that finer graph.
        """
        names = getattr(partition, "stage_layer_names", partition)
        if isinstance(names, (list, tuple)) and all(
            isinstance(stage, (list, tuple)) for stage in names
        ):
            flat = {n for stage in names for n in stage}
            if not flat <= set(self._graph.names):
                expanded = pipeline_graph(self.wrapped_model, expand_nested=True)
                if flat <= set(expanded.names):
                    return expanded
        return self._graph

    def _move_optimizer_state(self) -> None:
        """Moves a built optimizer's state next to its (moved) variables.

        Keras' TensorFlow optimizers create each variable's state colocated
        with the variable. A fresh optimizer of the same class and config,
        built on the same variables in their new places, therefore creates
        its state, in the same order, on the devices where ours belongs:
        each state variable moves to the device of its counterpart. No
        state is matched by name.
        """
        optimizer = getattr(self, "optimizer", None)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if optimizer is None or not getattr(optimizer, "built", False):
            return
        _compat.refresh_optimizer_index(optimizer)
        fresh = type(optimizer).from_config(optimizer.get_config())
        fresh.build(self.trainable_variables)
        if [tuple(v.shape) for v in fresh.variables] != [
            tuple(v.shape) for v in optimizer.variables
        ]:
            raise ValueError(
                "Cannot move the optimizer's state with the model's variables: "
                "a fresh copy of the optimizer builds different state. "
                f"Received: optimizer {type(optimizer).__name__} with "
                f"{len(optimizer.variables)} variables, a fresh copy with "
                f"{len(fresh.variables)}. Compile the PipelineModel after "
                "choosing the partition."
            )
        for state, placed in zip(optimizer.variables, fresh.variables):
            if state.value.device != placed.value.device:
                _compat.move_variable(state, placed.value.device)

    @property
    def profiled_model(self) -> keras.Model:
        """The model a `ProfilingCallback` measures: the wrapped model."""
        return self.wrapped_model

    def partition_from_profile(self, profile: Any, **kwargs: Any) -> Any:
        """Chooses a partition from `profile` and re-cuts the stages with it.

        `ProfilingCallback` calls this when it has profiled this model's
        wrapped model during `fit`.

        Args:
            profile: A `Profile` of the wrapped model (nested models expanded
                or not).
            **kwargs: Passed to `smd.partition` (`optimize`,
                `memory_capacity`, `bandwidth`, ...), over the
                `partition_options` given to the constructor.

        Returns:
            The `Partition` now in use.

        Example:
        ```python
        profile = smd.profile_model(pipe.wrapped_model, x_train[:64])
        part = pipe.partition_from_profile(profile, optimize="memory")
        ```
        """
        from tf_smdist.pipeline.partition import partition as solve

        kwargs = {**self._partition_options, **kwargs}
        kwargs.setdefault("microbatches", self._microbatches)
        kwargs.setdefault("schedule", self._schedule_name)
        kwargs.setdefault("virtual_stages", self._virtual)
        part = solve(profile, self._schedule.num_stages, **kwargs)
        self._pending_auto = False
        self.repartition(part)
        return part

    def auto_partition(self, sample_batch: Any, **kwargs: Any) -> Any:
        """Profiles the wrapped model on `sample_batch` and re-cuts the stages.

        This is what `partition="auto"` does on the first batch of `fit`;
        call it before training to partition up front.

        Args:
            sample_batch: inputs `x` of one batch.
            **kwargs: passed to `smd.partition` (`optimize`,
                `memory_capacity`, `bandwidth`, ...).

        Returns:
            The `Partition` now in use.

        Example:
        ```python
        part = pipe.auto_partition(x_train[:64], optimize="speed")
        print(part.report())
        ```
        """
        from tf_smdist.pipeline.profiler import profile_model

        # Stages keep nested models whole, so profile them whole too.
        profile = profile_model(
            self.wrapped_model,
            sample_batch,
            optimizer=getattr(self, "optimizer", None),
            expand_nested=False,
        )
        return self.partition_from_profile(profile, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Trains like `keras.Model.fit`, pipelined.

        With a `smd.ProfilingCallback` among the callbacks, or with
        `partition="auto"` and no partition chosen yet (a callback is then
        added), the first training batch runs on the current split; the
        wrapped model is then profiled, partitioned (the callback calls
        `partition_from_profile`), the train function is rebuilt, training
        continues pipelined, and the partition report is logged.

        Example:
        ```python
        pipe.fit(x, y, batch_size=64, callbacks=[smd.ProfilingCallback()])
        ```
        """
        from tf_smdist.pipeline.callback import ProfilingCallback

        if self._process is not None:
            from tf_smdist.pipeline import process_steps

            args, kwargs = process_steps.prepare_fit(self, args, kwargs)
            with process_steps.finalizing_local_variables(self):
                return super().fit(*args, **kwargs)
        callbacks = list(kwargs.get("callbacks") or [])
        if self._pending_auto and not any(
            isinstance(c, ProfilingCallback) for c in callbacks
        ):
            # Stages keep nested models whole: profile them whole too.
            batch_size = kwargs.get("batch_size") or 32
            callbacks.append(
                ProfilingCallback(batch_size=batch_size, expand_nested=False)
            )
        kwargs["callbacks"] = callbacks
        return super().fit(*args, **kwargs)

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The pipeline's stages, in order."""
        return self._stages

    @property
    def pipeline_schedule(self) -> schedules.Schedule:
        """The `Schedule` run for each training batch."""
        return self._schedule

    @property
    def microbatches(self) -> int:
        """The number of micro-batches per batch."""
        return self._microbatches

    def partition_report(self) -> str:
        """A text table of the stages: device, layers, parameters.

        Example:
        ```python
        print(pipe.partition_report())
        ```
        """
        lines = [
            f"PipelineModel {self.name}: {len(self._stages)} stages on "
            f"{self._num_devices} devices, schedule {self._schedule_name!r}, "
            f"{self._microbatches} micro-batches, bubble "
            f"{self._schedule.bubble_fraction:.3f}"
        ]
        if self._process is not None:
            lines.append(self._process.report())
        for stage in self._stages:
            params = sum(int(v.value.shape.num_elements()) for v in stage.variables)
            lines.append(
                f"  stage {stage.index} on {stage.device}: "
                f"{len(stage.layer_names)} layers "
                f"({stage.layer_names[0]} .. {stage.layer_names[-1]}), "
                f"{params} parameters, carries {stage.num_outputs} tensor(s)"
            )
        if self._partition is not None:
            lines.append(self._partition.report())
        return "\n".join(lines)

    # -- Keras API -------------------------------------------------------

    # Across processes an error in one rank's step (a stage's op failing at
    # run time) would leave the other stages waiting for its messages until
    # the watchdog's timeout: the functions stop this rank's communication
    # first (process_steps.stopping_peers_on_error).
    def make_train_function(self, force: bool = False) -> Any:
        return self._make_guarded("train", force)

    def make_test_function(self, force: bool = False) -> Any:
        return self._make_guarded("test", force)

    def make_predict_function(self, force: bool = False) -> Any:
        return self._make_guarded("predict", force)

    def _make_guarded(self, kind: str, force: bool) -> Any:
        attr = f"{kind}_function"
        if getattr(self, attr) is None or force:
            getattr(super(), f"make_{kind}_function")(force)
            setattr(self, attr, self._guarded(getattr(self, attr)))
        return getattr(self, attr)

    def _guarded(self, function: Any) -> Any:
        if self._process is None or function is None:
            return function
        from tf_smdist.pipeline.process_steps import stopping_peers_on_error

        return stopping_peers_on_error(function)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Configures training like `keras.Model.compile`, without XLA.

        A pipeline places its ops on several devices, which a single XLA
        cluster cannot, so `jit_compile` is always `False`. Only mean-reduced
        (`"sum_over_batch_size"`) or sum-reduced losses are accepted.

        Example:
        ```python
        pipe.compile(optimizer="adam", loss="mse", metrics=["mae"])
        ```
        """
        kwargs["jit_compile"] = False
        loss = kwargs.get("loss", args[1] if len(args) > 1 else None)
        reductions = set(_loss_reductions(loss))
        if not reductions <= {_MEAN, "sum"} or len(reductions) > 1:
            raise ValueError(
                "PipelineModel sums micro-batch losses, which reproduces the "
                "whole-batch loss only for one kind of reduction, "
                "'sum_over_batch_size' or 'sum'. Received: loss reductions "
                f"{sorted(reductions)}. Use one of those reductions."
            )
        self._loss_is_sum = reductions == {"sum"}
        super().compile(*args, **kwargs)
        self._keep_weight_decay_exclusions()
        if self._process is not None:
            self._rebuild_optimizer()
            return
        self._build_optimizer_on_stages()

    def _keep_weight_decay_exclusions(self) -> None:
        """Re-keys the optimizer's `exclude_from_weight_decay(var_list=...)`.

        Keras keys those variables by the TensorFlow variables behind them,
        which moving a variable to its stage's device replaces.
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            _compat.keep_weight_decay_exclusions(optimizer, optimizer, self._moved_keys)

    def _build_optimizer_on_stages(self) -> None:
        """Builds the optimizer now, so each variable's state is on its device.

        Keras' TensorFlow optimizers create each variable's state colocated
        with the variable (`add_variable_from_reference` runs under the
        distribution strategy's `colocate_vars_with`); built eagerly here,
        with the variables already on their stages' devices, the state
        lands next to them. Built later inside the traced train step it
        would land on the caller's device instead.
        """
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        if optimizer is None or optimizer.built:
            return
        optimizer.build(self.trainable_variables)

    @property
    def layers(self) -> list[keras.layers.Layer]:
        return self.wrapped_model.layers

    def get_weights(self) -> list[Any]:
        """The wrapped model's weights, in its own order.

        Across processes every rank must call it: each stage's weights come
        from the process that trains it, and every rank gets the whole model.

        Example:
        ```python
        plain_model.set_weights(pipe.get_weights())
        ```
        """
        if self._process is not None:
            self._process.sync_weights()
        return self.wrapped_model.get_weights()

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Sets the wrapped model's weights, given in its own order.

        Across processes, every rank passes the same weights.

        Example:
        ```python
        pipe.set_weights(plain_model.get_weights())
        ```
        """
        self.wrapped_model.set_weights(weights)

    def save(self, filepath: str, *args: Any, **kwargs: Any) -> None:
        """Saves the wrapped (unpartitioned) model, loadable by plain Keras.

        The file also holds the optimizer's state (as a compiled plain
        model's does), which `load_weights` restores; `keras.models.load_model`
        gives the plain, uncompiled model. Across processes every rank must
        call it (callbacks do): the stages' weights and optimizer state are
        gathered, and rank 0 writes the file.

        Example:
        ```python
        pipe.save("model.keras")
        model = keras.models.load_model("model.keras")  # a plain model
        ```
        """
        self._write(self.wrapped_model.save, filepath, *args, **kwargs)

    def save_weights(self, filepath: str, *args: Any, **kwargs: Any) -> None:
        """Saves the wrapped model's weights and the optimizer's state.

        The file is the one the plain model, compiled with the same
        optimizer, would write: it loads into the plain model (and its
        optimizer) and into a `PipelineModel` (`load_weights`). Across
        processes every rank must call it (`BackupAndRestore` does); rank 0
        writes the file.

        Example:
        ```python
        pipe.save_weights("pipe.weights.h5")
        ```
        """
        self._write(self.wrapped_model.save_weights, filepath, *args, **kwargs)

    def _write(self, write: Any, filepath: str, *args: Any, **kwargs: Any) -> None:
        from tf_smdist.pipeline import checkpoint

        if self._process is None:
            optimizer = checkpoint.built_optimizer(self)
        else:
            optimizer = self._process.gather_checkpoint()
            if self._topology.rank != 0:
                return
        with checkpoint.attached_optimizer(self.wrapped_model, optimizer):
            write(filepath, *args, **kwargs)

    def load_weights(self, filepath: str, *args: Any, **kwargs: Any) -> None:
        """Loads weights (and optimizer state) saved by the plain or pipelined model.

        Optimizer state in the file (from `save_weights`, `save`, or a
        compiled plain model's `save_weights`) is restored into the compiled
        optimizer. Across processes every rank must call it
        (`BackupAndRestore` does): rank 0 reads the file, and every rank
        takes its weights and its stage's optimizer state.

        Example:
        ```python
        pipe.load_weights("pipe.weights.h5")
        ```
        """
        from tf_smdist.pipeline import checkpoint

        optimizer = checkpoint.built_optimizer(self)
        if self._process is None:
            if optimizer is not None and not checkpoint.has_optimizer_state(filepath):
                optimizer = None
            with checkpoint.attached_optimizer(self.wrapped_model, optimizer):
                self.wrapped_model.load_weights(filepath, *args, **kwargs)
            return
        self._process.load_checkpoint(filepath, *args, **kwargs)

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(
            "A PipelineModel is not serialised itself. Received: a call to "
            "get_config. Use `pipe.save(path)`, which saves the wrapped model."
        )

    def _flat_inputs(self, x: Any) -> list[tf.Tensor]:
        # Checked here, on every rank alike and before any message, so that a
        # wrong structure fails everywhere at once (not in one stage, with its
        # peers waiting for messages that never come).
        model = self.wrapped_model
        names = [t.name for t in model.inputs]
        if isinstance(x, dict):
            # A model built on a dict of inputs takes that dict's keys (as
            # Keras does); any model takes its inputs' names.
            struct = model.input if isinstance(model.input, dict) else {}
            key_of = {id(t): k for k, t in struct.items()}
            keys = []
            for t in model.inputs:
                key = key_of.get(id(t), t.name)
                keys.append(t.name if key not in x and t.name in x else key)
            missing = [k for k in keys if k not in x]
            if missing:
                raise InputStructureError(
                    f"The model's inputs are {keys}; the input dict lacks "
                    f"{missing}. Received keys: {sorted(x)}.")
            return [x[k] for k in keys]
        flat = keras.tree.flatten(x) if isinstance(x, (list, tuple)) else [x]
        if len(flat) != len(names):
            raise InputStructureError(
                f"The model expects {len(names)} input(s) {names}, but received "
                f"{len(flat)}: {[getattr(t, 'shape', t) for t in flat]}. Pass a "
                "list or dict of them (a tf.data.Dataset of model inputs alone "
                "yields them as a 1-tuple: `from_tensor_slices(((a, b),))`).")
        return flat

    def _pack_outputs(self, flat: list[tf.Tensor]) -> Any:
        return keras.tree.pack_sequence_as(output_structure(self.wrapped_model), flat)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        """Runs the pipeline's forward tasks on `inputs`, micro-batched.

        The batch need not be a multiple of `microbatches` here: the first
        micro-batches then get one extra row. Under a `tf.GradientTape` the
        backward is differentiated through the placed forward ops. Across
        processes every rank passes the same global batch and gets the
        whole batch's outputs (not differentiable).
        """
        if self._process is not None:
            return self._process.call(inputs)
        micro = execution.split_microbatches(
            self._flat_inputs(inputs), self._microbatches, even=False
        )
        outs = execution.run_forward(
            self._stages, self._schedule, micro, training=training
        )
        with tf.device(self._stages[-1].device):
            flat = [
                tf.concat([o[i] for o in outs], axis=0)
                if len(outs) > 1
                else outs[0][i]
                for i in range(len(outs[0]))
            ]
        return self._pack_outputs(flat)

    def compute_gradients(
        self, x: Any, y: Any = None, sample_weight: Any = None
    ) -> tuple[tf.Tensor, Any, list[tf.Tensor]]:
        """Runs the full schedule on a batch; returns loss, outputs, gradients.

        This is the pipelined replacement for a `tf.GradientTape` block in a
        custom training loop: forwards, losses and backwards of every
        micro-batch run in the schedule's order, and the gradients come back
        summed over micro-batches, in the order of `trainable_variables`.

        Args:
            x: the batch's inputs.
            y: the batch's targets. Defaults to `None`.
            sample_weight: per-sample weights. Defaults to `None`.

        Returns:
            `(loss, y_pred, grads)`: the batch loss (the compiled loss plus
            the weight regularizers' penalties, as the plain model computes
            it on the whole batch), the predictions, and
            one gradient per trainable variable. Across processes (every rank
            passes the same global batch): the global batch's loss on every
            rank, `None`, and one gradient per variable of
            `local_trainable_variables`, already averaged over the
            data-parallel group. Under a `LossScaleOptimizer` (mixed
            precision) the gradients are those of the scaled loss, as in
            Keras' `train_step`; `apply_gradients` unscales them.

        Example:
        ```python
        @tf.function
        def step(x, y):
            loss, _, grads = pipe.compute_gradients(x, y)
            pipe.apply_gradients(grads)
            return loss
        ```
        """
        if self._process is not None:
            return self._process.compute_gradients(x, y, sample_weight)
        m = self._microbatches
        flat_x = self._flat_inputs(x)
        micro_x = execution.split_microbatches(flat_x, m)
        flat_y = keras.tree.flatten(y) if y is not None else []
        micro_y = execution.split_microbatches(flat_y, m) if flat_y else [[]] * m
        flat_w = (
            keras.tree.flatten(sample_weight) if sample_weight is not None else []
        )
        micro_w = execution.split_microbatches(flat_w, m) if flat_w else [[]] * m
        weight = 1.0 if getattr(self, "_loss_is_sum", False) else 1.0 / m

        def loss_fn(i: int, outputs: list[tf.Tensor]) -> tf.Tensor:
            y_i = keras.tree.pack_sequence_as(y, micro_y[i]) if flat_y else None
            w_i = (
                keras.tree.pack_sequence_as(sample_weight, micro_w[i])
                if flat_w
                else None
            )
            with self._stage_losses_apart():
                loss = self.compute_loss(
                    x=None,
                    y=y_i,
                    y_pred=self._pack_outputs(outputs),
                    sample_weight=w_i,
                    training=True,
                )
            return loss * weight

        loss_scale = self._loss_scale()
        outs, losses, stage_grads = execution.run_train(
            self._stages,
            self._schedule,
            micro_x,
            loss_fn,
            recompute=self._recompute,
            loss_scale=loss_scale,
            defer_weight_gradients=self._defer_weights,
        )
        self._check_added_losses()
        penalties = []
        for s, stage in enumerate(self._stages):
            # Each stage's weight regularizers, on its device (Keras adds them
            # to the loss once per step).
            with tf.device(stage.device):
                penalty, extra = execution.weight_penalty(
                    stage.trainable_variables, loss_scale)
                if penalty is not None:
                    penalties.append(penalty)
                    stage_grads[s] = [execution.add_gradient(g, e)
                                      for g, e in zip(stage_grads[s], extra)]
        with tf.device(self._stages[-1].device):
            loss = tf.add_n(losses)
            if penalties:
                loss = loss + tf.cast(tf.add_n(penalties), loss.dtype)
            flat = [
                tf.concat([o[i] for o in outs], axis=0) if m > 1 else outs[0][i]
                for i in range(len(outs[0]))
            ]
        by_id = {
            id(v): g
            for stage, grads in zip(self._stages, stage_grads)
            for v, g in zip(stage.trainable_variables, grads)
        }
        grads = [by_id.get(id(v)) for v in self.trainable_variables]
        return loss, self._pack_outputs(flat), grads

    def _check_added_losses(self) -> None:
        """`refuse_added_losses` once the stages' layers have run, at the
        first step (once: it recomputes every regularizer's penalty)."""
        if not getattr(self, "_added_losses_checked", False):
            refuse_added_losses(self.wrapped_model)
            self._added_losses_checked = True

    @property
    def losses(self) -> list[Any]:
        """The wrapped model's layer losses (its weight regularizers' penalties).

        Inside the pipeline's own training steps the compiled loss is
        computed without them (`_stage_losses_apart`): each stage adds its
        own variables' penalty and gradients (`execution.weight_penalty`).
        """
        if getattr(self, "_penalties_apart", False):
            return []
        return super().losses

    @contextlib.contextmanager
    def _stage_losses_apart(self) -> Iterator[None]:
        """`compute_loss` without the layer losses, which the stages add.

        Example:
        ```python
        with pipe._stage_losses_apart():
            loss = pipe.compute_loss(y=y, y_pred=y_pred)  # the compiled loss only
        ```
        """
        before = getattr(self, "_penalties_apart", False)
        self._penalties_apart = True
        try:
            yield
        finally:
            self._penalties_apart = before

    def _loss_scale(self) -> tf.Tensor | None:
        """The optimizer's current loss scale (mixed precision), else `None`.

        Keras' `train_step` differentiates `optimizer.scale_loss(loss)` and a
        `LossScaleOptimizer` divides the gradients by the same scale; the
        pipeline seeds its backward with that scale to the same effect.
        """
        optimizer = getattr(self, "optimizer", None)
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return None
        return optimizer.scale_loss(tf.constant(1.0))

    def train_step(self, data: Any) -> dict[str, Any]:
        if self._process is not None:
            return self._process.train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss, y_pred, grads = self.compute_gradients(x, y, sample_weight)
        tracker = _compat.compiled_parts(self)[0]
        if tracker is not None:
            tracker.update_state(
                loss, sample_weight=tf.shape(self._flat_inputs(x)[0])[0]
            )
        self.apply_gradients(grads)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def apply_gradients(self, grads: Sequence[Any]) -> None:
        """Applies one gradient per trainable variable, each on its device.

        Calls `self.optimizer.apply(grads, self.trainable_variables)`. Keras'
        optimizers build every update under the caller's device, so the
        gradients of all stages would travel to one device (over the network
        for remote stages) and back. Inside a `tf.function`, each update op
        without a device of its own is placed by a TensorFlow graph device
        function (`tf.compat.v1.device`, the public API that accepts one;
        `tf.device` takes only names): an op joins the device of its first
        placed input, and a variable read joins the device that the
        variable's values were first combined on. Every optimizer combines a
        variable's state with its gradient, which lives on the variable's
        stage, so each variable's update math runs there; ops that read
        state only (`sqrt(v)`) follow. Run eagerly, updates run where
        TensorFlow puts them: same results, slower for remote stages.

        Across processes, `grads` are this process's gradients (one per
        variable of `local_trainable_variables`, as `compute_gradients`
        returns them there) and update this process's variables; as in
        `fit`, a `global_clipnorm` clips by the whole model's norm, and the
        stage's moving statistics are then averaged over the pipelines
        (collective: every rank calls it).

        Args:
            grads: One gradient per variable of `trainable_variables`, as
                `compute_gradients` returns them.

        Example:
        ```python
        @tf.function
        def step(x, y):
            loss, _, grads = pipe.compute_gradients(x, y)
            pipe.apply_gradients(grads)
            return loss
        ```
        """
        if self._process is not None:
            # The whole model's global_clipnorm, and the moving statistics'
            # mean over the pipelines, as in `fit`.
            self._process.apply_gradients(list(grads))
            return
        if tf.executing_eagerly():
            self.optimizer.apply(grads, self.trainable_variables)
            return
        with tf.compat.v1.device(_UpdatePlacer()):
            self.optimizer.apply(grads, self.trainable_variables)


    def test_step(self, data: Any) -> dict[str, Any]:
        if self._process is not None:
            return self._process.test_step(data)
        return super().test_step(data)


class _UpdatePlacer:
    """Graph device function placing optimizer update ops with their data.

    An op without a device gets the device of its inputs (looking through
    identities, such as the `IdentityN` Keras groups all gradients with);
    failing that, the device learned for a variable it reads. A variable
    (the resource a `ReadVariableOp` reads) is learned the first time one of
    its reads meets a placed input, such as the gradient, in one op. An op
    whose inputs come from several devices gets no device (TensorFlow's
    default).
    """

    def __init__(self) -> None:
        self._devices: dict[Any, str] = {}

    def __call__(self, op: Any) -> str:
        if op.device:
            return op.device
        devices = {d for d in map(_source_device, op.inputs) if d}
        resources = [
            t.op.inputs[0].ref() if t.op.type == "ReadVariableOp" else t.ref()
            for t in op.inputs
            if t.op.type == "ReadVariableOp" or t.dtype == tf.resource
        ]
        if len(devices) > 1:
            return ""
        device = devices.pop() if devices else ""
        if not device:
            device = next(
                (self._devices[r] for r in resources if r in self._devices), ""
            )
        if device:
            for resource in resources:
                self._devices.setdefault(resource, device)
        return device


def _source_device(tensor: Any) -> str:
    """The device of `tensor`, or of what an identity op forwards into it."""
    for _ in range(8):
        if tensor.device:
            return tensor.device
        if tensor.op.type == "IdentityN":
            tensor = tensor.op.inputs[tensor.value_index]
        elif tensor.op.type == "Identity":
            tensor = tensor.op.inputs[0]
        else:
            return ""
    return ""
