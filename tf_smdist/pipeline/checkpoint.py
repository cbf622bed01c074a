"""Optimizer state in a `PipelineModel`'s weight files and checkpoints.

A compiled plain Keras model writes its optimizer's variables into its
weight files (`save_weights`, `save`) next to the layers' weights, and
reads them back in `load_weights`; that is how `BackupAndRestore` resumes
Adam's moments and step count. A `PipelineModel` saves the model it wraps,
which has no optimizer, so the functions here attach one for the duration of
the call: the file then holds exactly what the plain model compiled with
the same optimizer would write (and loads into it).

Across processes each rank's optimizer holds the state of its own stage's
variables only. `gather_optimizer` assembles the whole model's state on
rank 0 (from the ranks of pipeline 0 that own each stage) for writing;
`scatter_optimizer` hands a loaded state to every rank, which keeps its own
stage's part. Optimizer variables are matched by name: Keras names a
variable's state after the variable's path (`dense_kernel_momentum`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "attached_optimizer",
    "built_optimizer",
    "fresh_optimizer",
    "gather_optimizer",
    "has_optimizer_state",
    "scatter_optimizer",
]

_MISSING = object()


def built_optimizer(model: Any) -> keras.optimizers.Optimizer | None:
    """`model.optimizer` when it exists and is built, else `None`.

    Args:
        model: a Keras model (compiled or not).

    Example:
    >>> built_optimizer(pipe)  # doctest: +SKIP
    <keras.src.optimizers.adam.Adam object at ...>
    """
    optimizer = getattr(model, "optimizer", None)
    return optimizer if getattr(optimizer, "built", False) else None


@contextlib.contextmanager
def attached_optimizer(
    model: keras.Model, optimizer: keras.optimizers.Optimizer | None
) -> Iterator[None]:
    """Makes `optimizer` `model`'s optimizer inside the block, for saving.

    Keras writes (and reads) a model's `optimizer` attribute with its
    weights; the model's own attribute is restored afterwards.

    Args:
        model: the plain Keras model that is saved or loaded.
        optimizer: an optimizer built on `model.trainable_variables`, or
            `None` (nothing is attached).

    Example:
    ```python
    with attached_optimizer(pipe.wrapped_model, pipe.optimizer):
        pipe.wrapped_model.save_weights("model.weights.h5")
    ```
    """
    if optimizer is None:
        yield
        return
    before = getattr(model, "optimizer", _MISSING)
    model.optimizer = optimizer
    try:
        yield
    finally:
        if before is _MISSING:
            del model.optimizer
        else:
            model.optimizer = before


def has_optimizer_state(filepath: str | os.PathLike) -> bool:
    """Whether a Keras weight file (`.weights.h5` or `.keras`) holds optimizer state.

    Files this cannot read (remote, sharded) count as holding it.

    Args:
        filepath: the file `load_weights` reads.

    Example:
    >>> has_optimizer_state("backup/latest.weights.h5")  # doctest: +SKIP
    True
    """
    import h5py  # noqa: PLC0415 (a Keras dependency; only when loading)

    path = str(filepath)
    try:
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                data = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(data, "r") as f:
                return _optimizer_group(f)
        if path.endswith(".weights.h5"):
            with h5py.File(path, "r") as f:
                return _optimizer_group(f)
    except (OSError, KeyError, zipfile.BadZipFile):
        pass
    return True


def _optimizer_group(f: Any) -> bool:
    group = f.get("optimizer/vars")
    return group is not None and len(group) > 0


def fresh_optimizer(
    optimizer: keras.optimizers.Optimizer, variables: Sequence[Any]
) -> keras.optimizers.Optimizer:
    """A new optimizer of `optimizer`'s class and config, built on `variables`.

    Its variables have the names `optimizer` gives the same model variables.

    Args:
        optimizer: the optimizer to copy (its state is not copied).
        variables: the model variables to build the copy on.

    Example:
    >>> fresh_optimizer(pipe.optimizer, vars)  # doctest: +SKIP
    """
    fresh = type(optimizer).from_config(optimizer.get_config())
    fresh.build(list(variables))
    return fresh


def _keys(optimizer: keras.optimizers.Optimizer) -> list[str]:
    """A name per variable of `optimizer`, the same on every rank.

    A wrapping optimizer (`LossScaleOptimizer`, which mixed precision puts
    around the compiled one) holds its own `iteration` and `learning_rate`
    beside its inner optimizer's: the inner one's are prefixed `inner/`.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    inner_ids = {id(v) for v in inner.variables} if inner is not None else set()
    return [("inner/" if id(v) in inner_ids else "") + v.name
            for v in optimizer.variables]


def _by_name(optimizer: keras.optimizers.Optimizer) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for key, v in zip(_keys(optimizer), optimizer.variables):
        if key in named:
            raise ValueError(
                "Two optimizer variables have the same name, so a pipeline "
                "across processes cannot tell whose state each is. Received: "
                f"{key!r} twice in {type(optimizer).__name__}. Give the "
                "model's layers unique names."
            )
        named[key] = v
    return named


def _specs(full: keras.optimizers.Optimizer | None, rank: int) -> list[list]:
    """Rank 0's list of (name, shape, dtype) of `full`'s variables, on every rank."""
    from tf_smdist import _mpi_ops  # noqa: PLC0415 (only multi-process jobs)

    text = b""
    if rank == 0:
        specs = ([[key, list(v.shape), str(v.dtype)]
                  for key, v in zip(_keys(full), full.variables)]
                 if full is not None else [])
        text = json.dumps(specs).encode()
    return json.loads(_mpi_ops.broadcast_bytes(text, root=0).decode())


def gather_optimizer(
    runtime: Any, optimizer: keras.optimizers.Optimizer | None,
    model: keras.Model,
) -> keras.optimizers.Optimizer | None:
    """The whole model's optimizer state, assembled on rank 0 (collective).

    Rank 0 builds a fresh copy of `optimizer` on every trainable variable of
    `model`; each of its variables then takes the value held by the rank of
    pipeline 0 that trains the model variable it belongs to (step count and
    learning rate: any such rank, they are equal). Every rank must call it.

    Args:
        runtime: this process's `ProcessPipeline`.
        optimizer: this rank's built optimizer (its stage's state), or
            `None` on every rank (nothing is gathered).
        model: the wrapped Keras model.

    Returns:
        On rank 0, the assembled optimizer (built on
        `model.trainable_variables`, as a plain compiled model's); `None`
        elsewhere, or without an optimizer.

    Example:
    ```python
    full = gather_optimizer(runtime, pipe.optimizer, pipe.wrapped_model)
    ```
    """
    from tf_smdist import _mpi_ops  # noqa: PLC0415
    from tf_smdist.data_parallel import cluster  # noqa: PLC0415

    topo = runtime.topology
    full = (fresh_optimizer(optimizer, model.trainable_variables)
            if topo.rank == 0 and optimizer is not None else None)
    specs = _specs(full, topo.rank)
    if not specs:
        return None
    mine = _by_name(optimizer)
    if full is not None:
        _by_name(full)
    owners = np.array(
        [topo.rank if name in mine and topo.dp_rank == 0 else -1
         for name, _, _ in specs], dtype=np.int64)
    owners = cluster.allreduce_numpy(owners, reduction="max")
    missing = [specs[i][0] for i in np.flatnonzero(owners < 0)]
    if missing:
        raise RuntimeError(
            "No pipeline process holds some of the optimizer's state, so it "
            f"cannot be saved. Received: {missing[:5]} without an owner. "
            "Compile the PipelineModel with the same optimizer on every rank."
        )
    for i, (name, shape, dtype) in enumerate(specs):
        root = int(owners[i])
        value = (tf.convert_to_tensor(mine[name].value) if topo.rank == root
                 else tf.zeros(shape, dtype))
        value = _mpi_ops.broadcast(value, root=root)
        if full is not None:
            full.variables[i].assign(value)
    return full


def scatter_optimizer(
    runtime: Any, optimizer: keras.optimizers.Optimizer | None,
    full: keras.optimizers.Optimizer | None,
) -> None:
    """Gives every rank its stage's part of rank 0's `full` state (collective).

    Args:
        runtime: this process's `ProcessPipeline`.
        optimizer: this rank's built optimizer, which takes the values of
            the variables it shares a name with. `None`: it only takes part.
        full: on rank 0, the loaded whole-model optimizer, or `None` when
            the file held no optimizer state (nothing changes on any rank);
            ignored elsewhere.

    Example:
    ```python
    scatter_optimizer(runtime, pipe.optimizer, full if rank == 0 else None)
    ```
    """
    from tf_smdist import _mpi_ops  # noqa: PLC0415

    rank = runtime.topology.rank
    specs = _specs(full, rank)
    mine = _by_name(optimizer) if optimizer is not None else {}
    for i, (name, shape, dtype) in enumerate(specs):
        value = (tf.convert_to_tensor(full.variables[i].value) if rank == 0
                 else tf.zeros(shape, dtype))
        value = _mpi_ops.broadcast(value, root=0)
        if name in mine:
            mine[name].assign(value)
