"""Splitting a Keras model into pipeline stages that carry every live tensor."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

__all__ = [
    "Stage",
    "layer_order",
    "place_variables",
    "split_model",
    "stage_layer_names",
]

logger = logging.getLogger(__name__)


def _functional(model: keras.Model) -> keras.Model:
    """The model as a functional graph (a Sequential's own graph)."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            "PipelineModel needs a built Sequential or functional model whose "
            f"inputs are known. Received: model={model.name!r} of type "
            f"{type(model).__name__} without symbolic inputs. Start the model "
            "with `keras.Input(...)`, or build a functional model."
        )
    if isinstance(model, keras.Sequential):
        return keras.Model(inputs, outputs, name=model.name)
    return model


def _node_of(tensor: Any) -> Any:
    # Keras records each symbolic tensor's producer in `_keras_history`
    # (operation, node_index, tensor_index); no public API lists the nodes.
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def _is_input(node: Any) -> bool:
    return isinstance(node.operation, keras.layers.InputLayer)


def _graph_nodes(graph: keras.Model) -> list[Any]:
    """The graph's nodes (input layers excluded) in topological order."""
    rank = {id(op): i for i, op in enumerate(graph.operations)}
    seen: dict[int, Any] = {}
    stack = list(graph.outputs)
    while stack:
        node = _node_of(stack.pop())
        if id(node) in seen or _is_input(node):
            continue
        seen[id(node)] = node
        stack.extend(node.arguments.keras_tensors)
    nodes = list(seen.values())
    counts: dict[int, int] = {}
    for node in nodes:
        counts[id(node.operation)] = counts.get(id(node.operation), 0) + 1
    for node in nodes:
        if counts[id(node.operation)] > 1:
            raise NotImplementedError(
                "PipelineModel cannot split a model that calls a layer more "
                "than once (shared layers). Received: layer "
                f"{node.operation.name!r} called {counts[id(node.operation)]} "
                "times."
            )
    # Operations are sorted by depth from the inputs: a topological order.
    return sorted(nodes, key=lambda n: rank[id(n.operation)])


def layer_order(model: keras.Model) -> list[str]:
    """The names of the model's layers in the order stages are cut from.

    Input layers are left out; operations that are not layers (such as
    `x + y` in a functional model) go with the stage of their inputs.

    Args:
        model: a built Sequential or functional model.

    Returns:
        The layer names, in a topological order of the model's graph.

    Example:
    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> layer_order(keras.Model(inputs, keras.layers.Dense(2, name="b")(x)))
    ['a', 'b']
    """
    return [
        n.operation.name
        for n in _graph_nodes(_functional(model))
        if isinstance(n.operation, keras.layers.Layer)
    ]


def stage_layer_names(
    model: keras.Model, partition: Any, num_stages: int
) -> list[list[str]]:
    """Normalises a partition to one list of layer names per stage.

    Args:
        model: the model to split.
        partition: an object with `stage_layer_names` (a `Partition`), a
            sequence of stage sizes (layers per stage, in `layer_order`), or a
            sequence of layer-name lists.
        num_stages: the number of stages expected.

    Returns:
        The layer names of each stage.

    Example:
    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> m = keras.Model(inputs, keras.layers.Dense(2, name="b")(x))
    >>> stage_layer_names(m, [1, 1], 2)
    [['a'], ['b']]
    """
    order = layer_order(model)
    if hasattr(partition, "stage_layer_names"):
        partition = partition.stage_layer_names
    partition = list(partition)
    if len(order) < num_stages:
        raise ValueError(
            "The model has fewer layers than pipeline stages. Received: "
            f"num_stages={num_stages} for a model with {len(order)} layers. "
            f"Use at most {len(order)} stages."
        )
    if len(partition) != num_stages:
        raise ValueError(
            "The partition must have one entry per pipeline stage. Received: "
            f"partition={partition!r} with {len(partition)} entries for "
            f"num_stages={num_stages}."
        )
    if all(isinstance(p, int) and not isinstance(p, bool) for p in partition):
        if any(p < 1 for p in partition) or sum(partition) != len(order):
            raise ValueError(
                "Stage sizes must be positive and add up to the number of "
                f"layers. Received: partition={partition} (sum "
                f"{sum(partition)}) for a model with {len(order)} layers. "
                "Pass `partition='auto'` to choose the sizes automatically."
            )
        names, start = [], 0
        for size in partition:
            names.append(order[start : start + size])
            start += size
        return names
    names = [list(p) for p in partition]
    flat = [n for stage in names for n in stage]
    if sorted(flat) != sorted(order) or any(not stage for stage in names):
        missing = sorted(set(order) - set(flat))
        extra = sorted(set(flat) - set(order))
        raise ValueError(
            "The partition must put every layer of the model in exactly one "
            f"non-empty stage. Received: missing layers {missing}, unknown "
            f"layers {extra}, {len(flat)} names for {len(order)} layers."
        )
    return names


@dataclasses.dataclass(eq=False)
class Stage:
    """One pipeline stage: a slice of the model's graph on one device.

    A stage receives every tensor live across the cut before it and returns
    every tensor live across the cut after it; tensors that skip the stage
    are passed through on its device. It runs the wrapped model's own graph
    nodes (no layer is copied or called symbolically again, so the wrapped
    model stays exactly as it was and still saves as before).

    Attributes:
        index: the stage number, from 0.
        device: the TensorFlow device its ops and variables live on.
        layer_names: the layers it computes.
        nodes: the Keras graph nodes it runs, in topological order.
        in_keys: the ids of the symbolic tensors it receives.
        out_keys: the ids of the symbolic tensors it returns.
        layers: the Keras layers it holds.

    Example:
    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> m = keras.Model(inputs, keras.layers.Dense(2, name="b")(x))
    >>> [s.layer_names for s in split_model(m, [["a"], ["b"]], ["/CPU:0"] * 2)]
    [('a',), ('b',)]
    """

    index: int
    device: str
    layer_names: tuple[str, ...]
    nodes: tuple[Any, ...]
    in_keys: tuple[int, ...]
    out_keys: tuple[int, ...]
    layers: tuple[keras.layers.Layer, ...]

    @property
    def num_inputs(self) -> int:
        """How many tensors the stage receives."""
        return len(self.in_keys)

    @property
    def num_outputs(self) -> int:
        """How many tensors the stage returns."""
        return len(self.out_keys)

    @property
    def sources(self) -> tuple[tuple[str, int], ...]:
        """Per output, `("pass", i)` for input `i` passed through, or
        `("new", j)` for the `j`-th tensor the stage computes."""
        new = [k for k in self.out_keys if k not in self.in_keys]
        return tuple(
            ("pass", self.in_keys.index(k)) if k in self.in_keys
            else ("new", new.index(k))
            for k in self.out_keys
        )

    @property
    def variables(self) -> list[Any]:
        """The stage's variables (trainable and not)."""
        return [v for layer in self.layers for v in layer.weights]

    @property
    def trainable_variables(self) -> list[Any]:
        """The stage's trainable variables."""
        return [v for layer in self.layers for v in layer.trainable_weights]

    def __call__(
        self, inputs: Sequence[tf.Tensor], training: bool | None = None
    ) -> list[tf.Tensor]:
        """Runs the stage on its inputs; returns its outputs in order."""
        values = dict(zip(self.in_keys, inputs))
        for node in self.nodes:
            args, kwargs = node.arguments.fill_in(values)
            op = node.operation
            # As Keras' functional models do: pass `training` to the layers
            # that take it.
            if training is not None and "training" in getattr(
                op, "_call_context_args", ()
            ):
                kwargs["training"] = training
            outputs = keras.tree.flatten(op(*args, **kwargs))
            for symbolic, value in zip(node.outputs, outputs):
                values[id(symbolic)] = value
        return [
            tf.identity(values[k]) if k in self.in_keys else values[k]
            for k in self.out_keys
        ]

    def __repr__(self) -> str:
        return (
            f"Stage(index={self.index}, device={self.device!r}, "
            f"layers={list(self.layer_names)}, inputs={self.num_inputs}, "
            f"outputs={self.num_outputs})"
        )


def split_model(
    model: keras.Model,
    names: Sequence[Sequence[str]],
    devices: Sequence[str],
) -> list[Stage]:
    """Cuts a model into stages, one per list of layer names.

    Args:
        model: a built Sequential or functional model.
        names: the layer names of each stage (see `stage_layer_names`).
        devices: the device of each stage.

    Returns:
        The stages. Stage 0 takes the model's inputs in order; the last stage
        returns the model's outputs in order.

    Raises:
        ValueError: a stage needs a tensor that only a later stage computes.

    Example:
    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> m = keras.Model(inputs, keras.layers.Dense(2, name="b")(x + 1.0))
    >>> split_model(m, [["a"], ["b"]], ["/CPU:0", "/CPU:0"])[1].num_inputs
    1
    """
    graph = _functional(model)
    nodes = _graph_nodes(graph)
    stage_of_layer = {n: s for s, stage in enumerate(names) for n in stage}
    num_stages = len(names)
    producer: dict[int, int] = {id(t): -1 for t in graph.inputs}
    tensors: dict[int, Any] = {id(t): t for t in graph.inputs}
    node_stage: dict[int, int] = {}
    for node in nodes:
        parents = [producer[id(t)] for t in node.arguments.keras_tensors]
        earliest = max(parents, default=0)
        if isinstance(node.operation, keras.layers.Layer):
            s = stage_of_layer[node.operation.name]
            if s < earliest:
                raise ValueError(
                    f"Layer {node.operation.name!r} is in stage {s} but needs "
                    f"a tensor computed in stage {earliest}. Received: a "
                    "partition that is not in the model's data-flow order. "
                    "Give each stage a contiguous slice of `layer_order`."
                )
        else:
            s = max(earliest, 0)
        node_stage[id(node)] = s
        for t in node.outputs:
            producer[id(t)] = s
            tensors[id(t)] = t
    last_use: dict[int, int] = {}
    for node in nodes:
        for t in node.arguments.keras_tensors:
            last_use[id(t)] = max(last_use.get(id(t), -1), node_stage[id(node)])
    for t in graph.outputs:
        last_use[id(t)] = num_stages
    order = list(tensors)  # production order

    def live(cut: int) -> list[int]:
        return [t for t in order if producer[t] <= cut < last_use.get(t, -1)]

    stages = []
    for s in range(num_stages):
        ins = [id(t) for t in graph.inputs] if s == 0 else live(s - 1)
        outs = [id(t) for t in graph.outputs] if s == num_stages - 1 else live(s)
        stage_nodes = tuple(n for n in nodes if node_stage[id(n)] == s)
        layers = tuple(
            n.operation
            for n in stage_nodes
            if isinstance(n.operation, keras.layers.Layer)
        )
        stages.append(
            Stage(
                index=s,
                device=devices[s],
                layer_names=tuple(names[s]),
                nodes=stage_nodes,
                in_keys=tuple(ins),
                out_keys=tuple(outs),
                layers=layers,
            )
        )
    return stages


def place_variables(stage: Stage) -> None:
    """Moves the stage's variables onto its device, keeping their values.

    The Keras variable objects stay the same (so the wrapped model, its
    weight order and its saved files do not change); only the TensorFlow
    variable behind each one is re-created on the stage's device.
    """
    for variable in stage.variables:
        value = variable.value
        with tf.init_scope(), tf.device(stage.device):
            moved = tf.Variable(
                tf.identity(value),
                trainable=variable.trainable,
                name=value.name.split(":")[0],
            )
        # Keras 3's TensorFlow variable keeps its tf.Variable in `_value` and
        # adopts an existing tf.Variable through `_initialize`; no public API
        # re-creates a variable on another device.
        variable._initialize(moved)
