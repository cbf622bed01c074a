"""`DistributedOptimizer`: a Keras 3 optimizer whose gradients are all-reduced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.horovod import mpi_ops
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.gradients import GradientReducer
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

__all__ = ["DistributedOptimizer", "PartialDistributedOptimizer", "is_distributed"]

class _DistributedMixin:
    """Placed before the user's optimizer class: reduce, then apply."""

    # Its all-reduces are host ops XLA cannot compile: `model.compile`
    # keeps jit_compile off for it (see _compat.accept_tf_keras_spellings).
    _smdist_host_collectives = True

    def _hvd_setup(self, reducer: GradientReducer, backward_passes_per_step: int,
                   average_aggregated_gradients: bool) -> None:
        _agree_on_finite_gradients()
        self._hvd_reducer = reducer
        self._hvd_passes = int(backward_passes_per_step)
        self._hvd_average_aggregated = bool(average_aggregated_gradients)
        self._hvd_accumulators: list[Any] | None = None
        self._hvd_counter: Any = None

    def register_local_var(self, var: Any) -> None:
        """Keeps `var`'s gradient local: it is not reduced across ranks."""
        self._hvd_reducer.register_local(var)

    def _hvd_local_variables(self) -> list[Any]:
        """This rank's gradient aggregation state (never broadcast)."""
        if self._hvd_accumulators is None:
            return []
        return [*self._hvd_accumulators, self._hvd_counter]

    def build(self, variables: Sequence[Any]) -> None:
        super().build(variables)  # type: ignore[misc]
        if self._hvd_passes > 1 and self._hvd_accumulators is None:
            # Indices, not the variables: a list of variables set as an
            # attribute would be tracked as optimizer variables.
            self._hvd_index = {id(v): i for i, v in enumerate(variables)}
            self._hvd_accumulators = [
                self.add_variable_from_reference(v, name="hvd_aggregated")
                for v in variables]
            self._hvd_counter = self.add_variable(
                shape=(), dtype="int64", name="hvd_aggregation_counter")

    def apply(self, grads: Sequence[Any], trainable_variables: Any = None) -> Any:
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        grads = list(grads)
        if self._hvd_passes == 1:
            grads = self._hvd_reducer.reduce(grads, trainable_variables)
            return super().apply(grads, trainable_variables)  # type: ignore[misc]
        return self._hvd_aggregate_then_apply(grads, trainable_variables)

    def _hvd_aggregate_then_apply(self, grads: list[Any],
                                  trainable_variables: list[Any] | None) -> Any:
        if trainable_variables is None:
            raise ValueError(
                "DistributedOptimizer with backward_passes_per_step > 1 needs the "
                "variables. Received: trainable_variables=None. Call "
                "`apply(grads, model.trainable_variables)` or `apply_gradients`.")
        if not self.built:  # type: ignore[attr-defined]
            self.build(trainable_variables)
        index = self._hvd_index
        accumulators = [self._hvd_accumulators[index[id(v)]]
                        for v in trainable_variables]
        for acc, g in zip(accumulators, grads):
            if g is not None:
                acc.assign_add(tf.convert_to_tensor(g))
        counter = self._hvd_counter
        passes = self._hvd_passes

        def apply_now() -> Any:
            summed = []
            for acc, g in zip(accumulators, grads):
                if g is None:
                    summed.append(None)
                    continue
                value = tf.convert_to_tensor(acc)
                if self._hvd_average_aggregated:
                    value = value / tf.cast(passes, value.dtype)
                summed.append(value)
            reduced = self._hvd_reducer.reduce(summed, trainable_variables)
            super(_DistributedMixin, self).apply(reduced, trainable_variables)
            for acc in accumulators:
                acc.assign(tf.zeros_like(acc))
            counter.assign(0)
            return tf.constant(True)

        def skip() -> Any:
            self.iterations.assign_add(1)  # type: ignore[attr-defined]
            counter.assign_add(1)
            return tf.constant(False)

        return tf.cond(counter + 1 >= passes, apply_now, skip)


def _agree_on_finite_gradients() -> None:
    """Makes loss scaling around a DistributedOptimizer skip steps on every rank.

    Under a `mixed_float16` policy, Keras' `compile` wraps the optimizer in a
    `keras.optimizers.LossScaleOptimizer`, which checks this rank's scaled
    gradients for inf/NaN and calls the inner optimizer (whose `apply`
    all-reduces the gradients) only when they are finite. Where one rank's
    gradients overflow and another's do not, the first would skip the
    all-reduce the second waits in. So when the inner optimizer is a
    `DistributedOptimizer`, `check_finite` also takes the minimum of the
    flag over the optimizer's process set: every rank skips (and lowers
    its loss scale) when any rank overflowed, as a tf.distribute strategy's
    all-reduced gradients make it. Keras offers no hook for that check
    outside a tf.distribute strategy, so the public `check_finite` method is
    wrapped, once, on the first `DistributedOptimizer`; loss scaling around
    any other optimizer is not affected.
    """
    _compat.wrap_loss_scale_check(_agree_on_finite)


def _agree_on_finite(loss_scale_optimizer: Any, finite: Any) -> Any:
    """`finite` on every rank of the inner DistributedOptimizer's process set."""
    inner = getattr(loss_scale_optimizer, "inner_optimizer", None)
    if not is_distributed(inner):
        return finite
    from tf_smdist.horovod.collectives import allreduce  # noqa: PLC0415

    # Named like the gradients' all-reduces (not after the optimizer, whose
    # automatic name can differ between ranks); in a graph, by its op.
    reducer = inner._hvd_reducer
    name = f"{reducer.name}.all_finite" if tf.executing_eagerly() else None
    flag = allreduce(tf.cast(finite, tf.int32), op=mpi_ops.Min, name=name,
                     process_set=reducer.process_set)
    return flag > 0


def _distributed_class(cls: type, setup: Callable[[Any], None]) -> type:
    """A subclass of `cls` whose every instance is set up by `setup`.

    One class per `DistributedOptimizer` call, as in Horovod: the class holds
    that call's options, so `type(opt).from_config(opt.get_config())` (and
    Keras' own copies through `from_config`) make a distributed optimizer
    with the same options, not a half-built one.
    """

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        setup(self)

    return type(cls.__name__, (_DistributedMixin, cls), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__init__": __init__,
    })


def is_distributed(optimizer: Any) -> bool:
    """Whether `optimizer` was made by `DistributedOptimizer`.

    Example:
    >>> is_distributed(keras.optimizers.SGD())
    False
    """
    return isinstance(optimizer, _DistributedMixin)


def DistributedOptimizer(  # noqa: N802 (Horovod's name)
    optimizer: keras.optimizers.Optimizer,
    name: str | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    sparse_as_dense: bool = False,
    gradient_predivide_factor: float = 1.0,
    op: int = mpi_ops.Average,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = False,
    num_groups: int = 0,
    groups: int | Sequence[Sequence[Any]] | None = None,
    process_set: ProcessSet = global_process_set,
    scale_local_gradients: bool = True,
) -> keras.optimizers.Optimizer:
    """Returns a copy of `optimizer` that all-reduces gradients before applying them.

    The result is an instance of a subclass of the optimizer's own class
    (so `isinstance` checks and `get_config` keep working), built from the
    optimizer's config; use it in `model.compile(optimizer=...)` or call
    `apply_gradients` / `apply` in a custom loop. No distribution strategy
    is involved: each process runs its own model on its part of the data.

    Args:
        optimizer: a Keras 3 optimizer (not yet used for training).
        name: a name for the new optimizer. Defaults to `None` (keep it).
        device_dense: accepted for compatibility. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: `hvd.Compression.none` or `.fp16`. Defaults to
            `Compression.none`.
        sparse_as_dense: densify `tf.IndexedSlices` gradients before the
            all-reduce. Defaults to `False`.
        gradient_predivide_factor: with Average, divide by this before the
            sum and by `size / factor` after. Defaults to `1.0`.
        op: `hvd.Average` or `hvd.Sum`. Defaults to `hvd.Average`.
        backward_passes_per_step: accumulate this many local gradients
            before one all-reduce and update (the iteration counter still
            advances every step). Defaults to `1`.
        average_aggregated_gradients: divide the accumulated gradients by
            `backward_passes_per_step` (else they are summed). Defaults to
            `False`.
        num_groups: Horovod's older spelling of an int `groups`.
            Defaults to `0`.
        groups: an int (number of grouped all-reduces) or lists of
            variables reduced together. Defaults to `None`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        scale_local_gradients: divide the gradients of local variables
            (`register_local_var`) by the set's size, whatever `op` is (as
            Horovod does). Defaults to `True`.

    Returns:
        The distributed optimizer.

    Raises:
        TypeError: `optimizer` is not a Keras 3 optimizer.
        ValueError: an option is out of range.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1 * hvd.size()))
    >>> isinstance(opt, keras.optimizers.SGD)
    True
    """
    del device_dense, device_sparse
    return _make(optimizer, name, dict(
        compression=compression, sparse_as_dense=sparse_as_dense, op=op,
        gradient_predivide_factor=gradient_predivide_factor, groups=groups,
        num_groups=num_groups,
        process_set=process_set, scale_local_gradients=scale_local_gradients,
        name="DistributedOptimizer"), backward_passes_per_step,
        average_aggregated_gradients, [])


def _make(optimizer: keras.optimizers.Optimizer, name: str | None,
          reducer_args: dict[str, Any], backward_passes_per_step: int,
          average_aggregated_gradients: bool,
          local_layers: list[Any]) -> keras.optimizers.Optimizer:
    """`DistributedOptimizer` (and `PartialDistributedOptimizer`'s `local_layers`)."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "DistributedOptimizer wraps a Keras 3 optimizer. Received: "
            f"optimizer={type(optimizer).__name__}. Pass e.g. "
            "keras.optimizers.SGD(...) (tf.compat.v1 optimizers are not supported).")
    if is_distributed(optimizer):
        raise ValueError(
            "This optimizer is a DistributedOptimizer already. Received: "
            f"optimizer={optimizer.name}. Wrap the plain optimizer once.")
    passes = int(backward_passes_per_step)
    if passes < 1:
        raise ValueError(
            "`backward_passes_per_step` must be >= 1. Received: "
            f"backward_passes_per_step={backward_passes_per_step}")
    def setup(opt: Any) -> None:
        reducer = GradientReducer(**reducer_args)
        reducer.local_layers = local_layers
        opt._hvd_setup(reducer, passes, average_aggregated_gradients)

    config = optimizer.get_config()
    if name is not None:
        config["name"] = name
    distributed = _distributed_class(type(optimizer), setup).from_config(config)
    # exclude_from_weight_decay is not part of the config (Horovod's copy
    # lost it); one process with the optimizer keeps it.
    _compat.keep_weight_decay_exclusions(distributed, optimizer, {})
    return distributed


def PartialDistributedOptimizer(  # noqa: N802 (Horovod's name)
    optimizer: keras.optimizers.Optimizer,
    name: str | None = None,
    compression: type[Compressor] = Compression.none,
    sparse_as_dense: bool = False,
    gradient_predivide_factor: float = 1.0,
    op: int = mpi_ops.Average,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = False,
    groups: int | Sequence[Sequence[Any]] | None = None,
    process_set: ProcessSet = global_process_set,
    local_layers: Any = None,
    scale_local_gradients: bool = True,
) -> keras.optimizers.Optimizer:
    """A `DistributedOptimizer` that keeps `local_layers`' gradients local.

    Args:
        optimizer: a Keras 3 optimizer.
        name: a name for the new optimizer. Defaults to `None`.
        compression: a `hvd.Compression`. Defaults to `Compression.none`.
        sparse_as_dense: densify sparse gradients. Defaults to `False`.
        gradient_predivide_factor: see `DistributedOptimizer`.
            Defaults to `1.0`.
        op: `hvd.Average` or `hvd.Sum`. Defaults to `hvd.Average`.
        backward_passes_per_step: see `DistributedOptimizer`. Defaults to `1`.
        average_aggregated_gradients: see `DistributedOptimizer`.
            Defaults to `False`.
        groups: see `DistributedOptimizer`. Defaults to `None`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        local_layers: a Keras layer or layers whose trainable weights are
            updated from local gradients only. Defaults to `None`.
        scale_local_gradients: see `DistributedOptimizer`. Defaults to `True`.

    Example:
    >>> import tf_smdist.horovod.keras as hvd
    >>> hvd.init()
    >>> head = keras.layers.Dense(1)
    >>> opt = hvd.PartialDistributedOptimizer(keras.optimizers.SGD(),
    ...                                       local_layers=[head])
    """
    if local_layers is None:
        layers = []
    elif isinstance(local_layers, (list, tuple)):
        layers = list(local_layers)
    else:
        layers = [local_layers]
    return _make(optimizer, name, dict(
        compression=compression, sparse_as_dense=sparse_as_dense, op=op,
        gradient_predivide_factor=gradient_predivide_factor, groups=groups,
        process_set=process_set, scale_local_gradients=scale_local_gradients,
        name="DistributedOptimizer"), backward_passes_per_step,
        average_aggregated_gradients, layers)
