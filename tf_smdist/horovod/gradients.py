"""Gradient all-reduction shared by the gradient tape and the Keras optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_smdist.horovod import mpi_ops
from tf_smdist.horovod.collectives import allreduce, grouped_allreduce, resolve_op
from tf_smdist.horovod.compression import Compression, Compressor
from tf_smdist.horovod.process_sets import ProcessSet, global_process_set

__all__ = ["GradientReducer"]


class GradientReducer:
    """Averages (or sums) a list of gradients over the ranks, Horovod's way.

    Args:
        compression: a `hvd.Compression`. Defaults to `Compression.none`.
        sparse_as_dense: densify `tf.IndexedSlices` gradients before the
            all-reduce (instead of all-gathering them). Defaults to `False`.
        op: `hvd.Average` or `hvd.Sum` (Min/Max/Product are accepted too).
            Defaults to `hvd.Average`.
        gradient_predivide_factor: with Average, divide by this before the
            sum and by `size / factor` after. Defaults to `1.0`.
        groups: `None`/`0` (one all-reduce per gradient, fused by the
            engine), a positive int (that many grouped all-reduces), or
            lists of variables whose gradients are reduced together.
            Defaults to `None`.
        num_groups: Horovod's older spelling of an int `groups`, used when
            `groups` is `None`. Defaults to `0`.
        process_set: the ranks to reduce over. Defaults to
            `global_process_set`.
        scale_local_gradients: divide the gradients of local variables by
            the process set's size, whatever `op` is (as Horovod does).
            Defaults to `True`.
        name: the prefix of the collectives' names. Defaults to
            `"DistributedGradients"`.

    Example:
    >>> import tf_smdist.horovod as hvd
    >>> hvd.init()
    >>> v = tf.Variable([1.0])
    >>> GradientReducer().reduce([tf.constant([2.0])], [v])[0].numpy()
    array([2.], dtype=float32)
    """

    def __init__(
        self,
        *,
        compression: type[Compressor] = Compression.none,
        sparse_as_dense: bool = False,
        op: int = mpi_ops.Average,
        gradient_predivide_factor: float = 1.0,
        groups: int | Sequence[Sequence[Any]] | None = None,
        num_groups: int = 0,
        process_set: ProcessSet = global_process_set,
        scale_local_gradients: bool = True,
        name: str = "DistributedGradients",
    ) -> None:
        if groups is None and num_groups:
            groups = num_groups
        self.op = resolve_op(op)
        if gradient_predivide_factor != 1.0 and self.op != mpi_ops.Average:
            raise ValueError(
                "`gradient_predivide_factor` only applies to op=hvd.Average. "
                f"Received: gradient_predivide_factor={gradient_predivide_factor}, "
                f"op={op}. Use op=hvd.Average or leave the factor at 1.0.")
        if not gradient_predivide_factor > 0:
            raise ValueError(
                "`gradient_predivide_factor` must be positive. "
                f"Received: gradient_predivide_factor={gradient_predivide_factor}")
        if isinstance(groups, bool) or (isinstance(groups, int) and groups < 0):
            raise ValueError(
                "`groups` must be a non-negative int or a list of lists of "
                f"variables. Received: groups={groups!r}")
        if groups is not None and not isinstance(groups, int):
            groups = [list(g) for g in groups]
        self.compression = compression
        self.sparse_as_dense = bool(sparse_as_dense)
        self.groups = groups
        self.process_set = process_set
        self.scale_local_gradients = bool(scale_local_gradients)
        self.name = name
        if self.op == mpi_ops.Average:
            self.prescale = 1.0 / float(gradient_predivide_factor)
            self.postscale = float(gradient_predivide_factor)
        else:
            self.prescale = self.postscale = 1.0
        self._local: set[int] = set()
        # Layers whose trainable weights (created later, perhaps) stay local.
        self.local_layers: list[Any] = []

    def register_local(self, variable: Any) -> None:
        """Marks `variable` local: its gradient is not reduced across ranks."""
        self._local.add(id(variable))

    def local_ids(self) -> set[int]:
        """The ids of the local variables (registered, or of `local_layers`)."""
        local = set(self._local)
        for layer in self.local_layers:
            local.update(id(v) for v in layer.trainable_weights)
        return local

    def _partition(self, shared: list[int], variables: Sequence[Any] | None
                   ) -> list[list[int]]:
        groups = self.groups
        if not groups:
            return [[i] for i in shared]
        if isinstance(groups, int):
            return [list(c) for c in np.array_split(np.array(shared, int), groups)
                    if len(c)]
        if variables is None:
            raise ValueError(
                "`groups` given as lists of variables needs the variables of "
                "the gradients. Received: variables=None. Pass the variables "
                "(e.g. `apply(grads, model.trainable_variables)`).")
        where = {}
        for g, group in enumerate(groups):
            for var in group:
                where[id(var)] = g
        by_group: dict[int, list[int]] = {}
        out: list[list[int]] = []
        for i in shared:
            g = where.get(id(variables[i]))
            if g is None:
                out.append([i])
            else:
                by_group.setdefault(g, []).append(i)
        return [by_group[g] for g in sorted(by_group)] + out

    def reduce(self, grads: Sequence[Any], variables: Sequence[Any] | None = None
               ) -> list[Any]:
        """Returns the reduced gradients (None stays None), in order.

        Args:
            grads: the gradients (tensors, `tf.IndexedSlices` or None).
            variables: their variables, for local variables and variable
                groups. Defaults to `None`.
        """
        grads = list(grads)
        out: list[Any] = list(grads)
        if self.process_set is not None and not self.process_set.included():
            # A rank outside the process set keeps its own gradients, as
            # Horovod's conditional all-reduce does.
            return out
        local = self.local_ids()
        # Eagerly the calls run one after another and fixed names match them.
        # In a graph each op's unique name names it: two tapes or optimizers
        # in one function (a GAN's) then run side by side without colliding.
        eager = tf.executing_eagerly()
        shared = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if variables is not None and id(variables[i]) in local:
                if self.scale_local_gradients:
                    out[i] = _divide(g, self.process_set.size())
                continue
            if self.sparse_as_dense and isinstance(g, tf.IndexedSlices):
                grads[i] = tf.convert_to_tensor(g)
            elif isinstance(g, tf.IndexedSlices):
                # Gathered, not summed: gradient_predivide_factor's two
                # factors cancel (allreduce refuses them, as Horovod's does).
                out[i] = allreduce(
                    g, op=self.op, name=f"{self.name}.{i}" if eager else None,
                    process_set=self.process_set)
                continue
            shared.append(i)
        for group in self._partition(shared, variables):
            if len(group) == 1 and not (isinstance(self.groups, int) and self.groups):
                i = group[0]
                out[i] = allreduce(
                    grads[i], compression=self.compression, op=self.op,
                    prescale_factor=self.prescale, postscale_factor=self.postscale,
                    name=f"{self.name}.{i}" if eager else None,
                    process_set=self.process_set)
                continue
            reduced = grouped_allreduce(
                [grads[i] for i in group], compression=self.compression, op=self.op,
                prescale_factor=self.prescale, postscale_factor=self.postscale,
                name=f"{self.name}.group{group[0]}" if eager else None,
                process_set=self.process_set)
            for i, r in zip(group, reduced):
                out[i] = r
        return out


def _divide(grad: Any, n: int) -> Any:
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values / tf.cast(n, grad.values.dtype),
                                grad.indices, grad.dense_shape)
    return grad / tf.cast(n, grad.dtype)
