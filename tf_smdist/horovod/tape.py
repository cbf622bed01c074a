"""`DistributedGradientTape`: a GradientTape whose gradients are all-reduced."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from tf_smdist.horovod import mpi_ops
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.gradients import GradientReducer
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

__all__ = ["DistributedGradientTape", "PartialDistributedGradientTape"]


class DistributedGradientTape:
    """Wraps a `tf.GradientTape`; `gradient()` returns all-reduced gradients.

    Every other attribute (`watch`, `stop_recording`, `jacobian`, ...) is the
    wrapped tape's. Use it either after recording or as the recording
    context itself.

    Args:
        gradtape: the `tf.GradientTape` to wrap.
        device_dense: accepted for compatibility. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: `hvd.Compression.none` or `.fp16`. Defaults to
            `Compression.none`.
        sparse_as_dense: densify `tf.IndexedSlices` gradients instead of
            all-gathering them. Defaults to `False`.
        op: `hvd.Average` or `hvd.Sum`. Defaults to `hvd.Average`.
        gradient_predivide_factor: with Average, divide by this factor
            before the sum and by `size / factor` after. Defaults to `1.0`.
        num_groups: Horovod's older spelling of an int `groups`.
            Defaults to `0`.
        groups: an int (number of grouped all-reduces) or lists of
            variables reduced together. Defaults to `None`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        scale_local_gradients: divide the gradients of registered local
            sources by the set's size, whatever `op` is (as Horovod does).
            Defaults to `True`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> w = tf.Variable(2.0)
    >>> with tf.GradientTape() as tape:
    ...     loss = w * w
    >>> tape = hvd.DistributedGradientTape(tape)
    >>> float(tape.gradient(loss, w))
    4.0
    """

    def __init__(
        self,
        gradtape: tf.GradientTape,
        device_dense: str = "",
        device_sparse: str = "",
        compression: type[Compressor] = Compression.none,
        sparse_as_dense: bool = False,
        op: int = mpi_ops.Average,
        gradient_predivide_factor: float = 1.0,
        num_groups: int = 0,
        groups: int | Sequence[Sequence[Any]] | None = None,
        process_set: ProcessSet = global_process_set,
        scale_local_gradients: bool = True,
    ) -> None:
        del device_dense, device_sparse
        if not isinstance(gradtape, tf.GradientTape):
            raise TypeError(
                "`gradtape` must be a tf.GradientTape. Received: "
                f"gradtape={type(gradtape).__name__}. Wrap the tape: "
                "`hvd.DistributedGradientTape(tf.GradientTape())`.")
        self._tape = gradtape
        self._reducer = GradientReducer(
            compression=compression, sparse_as_dense=sparse_as_dense, op=op,
            gradient_predivide_factor=gradient_predivide_factor, groups=groups,
            num_groups=num_groups,
            process_set=process_set, scale_local_gradients=scale_local_gradients,
            name="DistributedGradientTape")

    @property
    def tape(self) -> tf.GradientTape:
        """The wrapped `tf.GradientTape`."""
        return self._tape

    def __getattr__(self, name: str) -> Any:
        if name == "_tape":
            raise AttributeError(name)
        return getattr(self._tape, name)

    def __enter__(self) -> DistributedGradientTape:
        self._tape.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._tape.__exit__(*exc)

    def register_local_source(self, source: Any) -> None:
        """Keeps `source`'s gradient local: it is not reduced across ranks.

        With `scale_local_gradients`, the gradient is divided by the
        process set's size (whatever `op` is), as Horovod does.

        Args:
            source: a variable passed to `gradient` as a source.
        """
        self._reducer.register_local(source)

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 **kwargs: Any) -> Any:
        """Computes the gradients like `tf.GradientTape.gradient`, then reduces them.

        Args:
            target: the tensor(s) to differentiate.
            sources: a variable or a (nested) structure of variables.
            output_gradients: as in `tf.GradientTape.gradient`.
                Defaults to `None`.
            **kwargs: passed to the wrapped tape (e.g. `unconnected_gradients`).

        Returns:
            The reduced gradients, in the structure of `sources`.
        """
        grads = self._tape.gradient(target, sources, output_gradients, **kwargs)
        flat_sources = tf.nest.flatten(sources)
        flat_grads = tf.nest.flatten(grads, expand_composites=False)
        reduced = self._reducer.reduce(flat_grads, flat_sources)
        return tf.nest.pack_sequence_as(grads, reduced, expand_composites=False)

    def get_local_and_global_gradients(
            self, target: Any, sources: Any, output_gradients: Any = None,
            **kwargs: Any) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
        """`gradient`'s results split into local and reduced (variable, gradient) pairs.

        Takes `gradient`'s arguments.

        Returns:
            `(local, global)`: the pairs of the local variables (registered,
            or of `local_layers`), then those of the others, in source order.

        Example:
        >>> import keras, tf_smdist.horovod as hvd
        >>> hvd.init()
        >>> head = keras.layers.Dense(1); head.build((None, 2))
        >>> with tf.GradientTape() as tape:
        ...     loss = tf.reduce_sum(head(tf.ones([1, 2])))
        >>> tape = hvd.PartialDistributedGradientTape(tape, local_layers=[head])
        >>> local_pairs, global_pairs = tape.get_local_and_global_gradients(
        ...     loss, head.trainable_variables)
        >>> len(local_pairs), len(global_pairs)
        (2, 0)
        """
        grads = self.gradient(target, sources, output_gradients, **kwargs)
        local = self._reducer.local_ids()
        pairs = list(zip(tf.nest.flatten(sources),
                         tf.nest.flatten(grads, expand_composites=False)))
        return ([p for p in pairs if id(p[0]) in local],
                [p for p in pairs if id(p[0]) not in local])


class PartialDistributedGradientTape(DistributedGradientTape):
    """A `DistributedGradientTape` that keeps some layers' gradients local.

    Args:
        gradtape: the `tf.GradientTape` to wrap.
        device_dense: accepted for compatibility. Defaults to `""`.
        device_sparse: accepted for compatibility. Defaults to `""`.
        compression: a `hvd.Compression`. Defaults to `Compression.none`.
        sparse_as_dense: densify sparse gradients. Defaults to `False`.
        op: `hvd.Average` or `hvd.Sum`. Defaults to `hvd.Average`.
        gradient_predivide_factor: see `DistributedGradientTape`.
            Defaults to `1.0`.
        num_groups: see `DistributedGradientTape`. Defaults to `0`.
        groups: see `DistributedGradientTape`. Defaults to `None`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        local_layers: a Keras layer or layers whose trainable weights stay
            local. Defaults to `None`.
        scale_local_gradients: see `DistributedGradientTape`.
            Defaults to `True`.

    Example:
    >>> import keras, tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> layer = keras.layers.Dense(1); layer.build((None, 2))
    >>> tape = hvd.PartialDistributedGradientTape(tf.GradientTape(),
    ...                                           local_layers=[layer])
    """

    def __init__(
        self,
        gradtape: tf.GradientTape,
        device_dense: str = "",
        device_sparse: str = "",
        compression: type[Compressor] = Compression.none,
        sparse_as_dense: bool = False,
        op: int = mpi_ops.Average,
        gradient_predivide_factor: float = 1.0,
        num_groups: int = 0,
        groups: int | Sequence[Sequence[Any]] | None = None,
        process_set: ProcessSet = global_process_set,
        local_layers: Any = None,
        scale_local_gradients: bool = True,
    ) -> None:
        super().__init__(
            gradtape, device_dense, device_sparse, compression, sparse_as_dense, op,
            gradient_predivide_factor, num_groups, groups, process_set=process_set,
            scale_local_gradients=scale_local_gradients)
        layers = list(_as_list(local_layers))
        for layer in layers:
            if not hasattr(layer, "trainable_weights"):
                raise TypeError(
                    "`local_layers` must be Keras layers. Received: an item of "
                    f"type {type(layer).__name__}. Pass layers, or register "
                    "variables with `register_local_source`.")
        self._reducer.local_layers = layers


def _as_list(items: Any) -> Iterable[Any]:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        return items
    return [items]
