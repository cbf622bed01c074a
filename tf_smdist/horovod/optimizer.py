"""`horovod.tensorflow.DistributedOptimizer`: Keras 3 and `tf.compat.v1` optimizers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_smdist.horovod import mpi_ops
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.gradients import GradientReducer
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

__all__ = ["DistributedOptimizer"]


def DistributedOptimizer(  # noqa: N802 (Horovod's name)
    optimizer: Any,
    name: str | None = None,
    use_locking: bool = False,
    device_dense: str = "",
    device_sparse: str = "",
    compression: type[Compressor] = Compression.none,
    sparse_as_dense: bool = False,
    backward_passes_per_step: int = 1,
    op: int = mpi_ops.Average,
    gradient_predivide_factor: float = 1.0,
    average_aggregated_gradients: bool = False,
    num_groups: int = 0,
    groups: int | Sequence[Sequence[Any]] | None = None,
    process_set: ProcessSet = global_process_set,
    scale_local_gradients: bool = True,
) -> Any:
    """Wraps an optimizer so that it all-reduces gradients before applying them.

    Horovod's TensorFlow-level `DistributedOptimizer`. A Keras 3 optimizer
    is wrapped by `tf_smdist.horovod.keras.DistributedOptimizer` (use it in
    `model.compile` or call `apply_gradients`). A TF1 optimizer
    (`tf.compat.v1.train.Optimizer`) is wrapped so that `compute_gradients`
    (and so `minimize`) returns the gradients averaged (or summed) over the
    ranks, for `tf.compat.v1` graphs and sessions.

    Args:
        optimizer: a Keras 3 optimizer or a `tf.compat.v1.train.Optimizer`.
        name: the wrapper's name. Defaults to `None` (`"Distributed"` + the
            optimizer's class name for a TF1 optimizer; the optimizer's own
            name for a Keras one).
        use_locking: passed to the TF1 `Optimizer` base. Defaults to `False`.
        device_dense: accepted for compatibility. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: `hvd.Compression.none` or `.fp16`. Defaults to
            `Compression.none`.
        sparse_as_dense: densify `tf.IndexedSlices` gradients before the
            all-reduce (else they are all-gathered). Defaults to `False`.
        backward_passes_per_step: local gradient accumulation before each
            all-reduce; Keras optimizers only (a TF1 optimizer takes `1`).
            Defaults to `1`.
        op: `hvd.Average` or `hvd.Sum` (`Min`, `Max`, `Product` too).
            Defaults to `hvd.Average`.
        gradient_predivide_factor: with Average, divide by this before the
            sum and by `size / factor` after. Defaults to `1.0`.
        average_aggregated_gradients: with `backward_passes_per_step > 1`,
            divide the accumulated gradients by it. Defaults to `False`.
        num_groups: Horovod's older spelling of an int `groups`.
            Defaults to `0`.
        groups: an int (that many grouped all-reduces) or lists of variables
            reduced together. Defaults to `None`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        scale_local_gradients: divide the gradients of local variables
            (`register_local_var`) by the set's size. Defaults to `True`.

    Returns:
        The distributed optimizer.

    Raises:
        ValueError: `optimizer` is neither kind, or an option is out of range
            (as Horovod raises).
        NotImplementedError: `backward_passes_per_step > 1` with a TF1
            optimizer.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> opt = hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1))
    >>> opt.get_name()
    'DistributedGradientDescentOptimizer'
    """
    del device_dense, device_sparse
    if isinstance(optimizer, keras.optimizers.Optimizer):
        from tf_smdist.horovod import keras as hvd_keras  # noqa: PLC0415 (cycle)

        return hvd_keras.DistributedOptimizer(
            optimizer, name=name, compression=compression,
            sparse_as_dense=sparse_as_dense,
            gradient_predivide_factor=gradient_predivide_factor, op=op,
            backward_passes_per_step=backward_passes_per_step,
            average_aggregated_gradients=average_aggregated_gradients,
            num_groups=num_groups, groups=groups, process_set=process_set,
            scale_local_gradients=scale_local_gradients)
    if not isinstance(optimizer, tf.compat.v1.train.Optimizer):
        raise ValueError(
            "DistributedOptimizer wraps a Keras 3 optimizer or a "
            "tf.compat.v1.train.Optimizer. Received: "
            f"optimizer={type(optimizer).__name__}.")
    if int(backward_passes_per_step) != 1:
        raise NotImplementedError(
            "`backward_passes_per_step` > 1 is supported for Keras optimizers "
            "only. Received: backward_passes_per_step="
            f"{backward_passes_per_step} with {type(optimizer).__name__}. "
            "Accumulate the gradients yourself, or use a keras.optimizers one.")
    reducer = GradientReducer(
        compression=compression, sparse_as_dense=sparse_as_dense, op=op,
        gradient_predivide_factor=gradient_predivide_factor, groups=groups,
        num_groups=num_groups, process_set=process_set,
        scale_local_gradients=scale_local_gradients, name="DistributedOptimizer")
    return _LegacyDistributedOptimizer(
        optimizer, name or f"Distributed{type(optimizer).__name__}", use_locking,
        reducer)


class _LegacyDistributedOptimizer(tf.compat.v1.train.Optimizer):
    """A `tf.compat.v1.train.Optimizer` whose gradients are all-reduced.

    `compute_gradients` reduces what the wrapped optimizer computes;
    `apply_gradients` and the slot queries go to the wrapped optimizer, so
    its own update rule and state are used unchanged.
    """

    def __init__(self, optimizer: Any, name: str, use_locking: bool,
                 reducer: GradientReducer) -> None:
        super().__init__(name=name, use_locking=use_locking)
        self._optimizer = optimizer
        self._reducer = reducer

    def compute_gradients(self, *args: Any, **kwargs: Any) -> list[tuple[Any, Any]]:
        """The wrapped optimizer's `(gradient, variable)` pairs, gradients reduced."""
        pairs = list(self._optimizer.compute_gradients(*args, **kwargs))
        grads = self._reducer.reduce([g for g, _ in pairs], [v for _, v in pairs])
        return [(g, v) for g, (_, v) in zip(grads, pairs)]

    def register_local_var(self, var: Any) -> None:
        """Keeps `var`'s gradient local: it is not reduced across ranks.

        With `scale_local_gradients` it is divided by the process set's
        size, as Horovod does.

        Args:
            var: a variable the optimizer computes a gradient for.
        """
        self._reducer.register_local(var)

    def apply_gradients(self, *args: Any, **kwargs: Any) -> Any:
        """Applies the gradients with the wrapped optimizer."""
        return self._optimizer.apply_gradients(*args, **kwargs)

    def get_slot(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped optimizer's slot."""
        return self._optimizer.get_slot(*args, **kwargs)

    def get_slot_names(self, *args: Any, **kwargs: Any) -> list[str]:
        """The wrapped optimizer's slot names."""
        return self._optimizer.get_slot_names(*args, **kwargs)

    def variables(self) -> list[Any]:
        """The wrapped optimizer's variables."""
        return self._optimizer.variables()
