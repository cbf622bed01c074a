"""Splitting a Keras model into pipeline stages that carry every live tensor.

The stages are cut from the node order of `tf_smdist.pipeline.graph` (the
one walker of the Keras graph): the same order, names and tensor keys the
profiler measures, so a `Partition` made from a `Profile` names stage
contents directly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tf_smdist import _compat
from tf_smdist.pipeline.graph import GraphNode, LayerGraph, flatten_model

__all__ = [
    "Stage",
    "layer_order",
    "pipeline_graph",
    "place_variables",
    "split_model",
    "stage_layer_names",
]

logger = logging.getLogger(__name__)


def pipeline_graph(model: keras.Model, *, expand_nested: bool = False) -> LayerGraph:
    """The model's flattened graph, as a pipeline cuts it.

    Args:
        model: A built Sequential or functional model.
        expand_nested: Whether nested Sequential and functional models are
            split into their own layers (named `outer/inner`). Defaults to
            `False` (each nested model is one node).

    Returns:
        The `LayerGraph`.

    Raises:
        ValueError: for a model whose inputs are unknown or that is
            subclassed.
        NotImplementedError: for a model that calls a layer more than once.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> pipeline_graph(keras.Model(inputs, keras.layers.Dense(2, name="b")(x))).names
    ['a', 'b']
    """
    graph = flatten_model(model, expand_nested=expand_nested)
    calls: dict[int, list[str]] = {}
    for node in graph.nodes:
        if node.is_layer:
            calls.setdefault(id(node.operation), []).append(node.name)
    for names in calls.values():
        if len(names) > 1:
            raise NotImplementedError(
                "PipelineModel cannot split a model that calls a layer more "
                f"than once (shared layers). Received: layer {names[0]!r} "
                f"called {len(names)} times ({names}). Call each layer once, "
                "or wrap the part that shares it in a nested model."
            )
    # A layer of a nested model that the model also calls elsewhere: two
    # nodes update the same variables, which two stages cannot.
    users: dict[int, tuple[Any, list[str]]] = {}
    for node in graph.nodes:
        if node.is_layer:
            for v in {id(v): v for v in node.operation.weights}.values():
                users.setdefault(id(v), (v, []))[1].append(node.name)
    for v, names in users.values():
        if len(names) > 1:
            raise NotImplementedError(
                "PipelineModel cannot split a model whose layers share "
                f"variables. Received: variable {getattr(v, 'path', v.name)!r} "
                f"used by {names}. Call each layer once, or wrap the part that "
                "shares it in one nested model."
            )
    return graph


def layer_order(model: keras.Model) -> list[str]:
    """The names stages are cut from, in order: the model graph's nodes.

    Each node is one call of a Keras layer, or a bare operation of a
    functional model (such as `x + y`); nested models are one node each.
    These are the names a `Profile` (with `expand_nested=False`) and a
    `Partition` use; stage sizes count them.

    Args:
        model: A built Sequential or functional model.

    Returns:
        The node names, in the topological order of
        `tf_smdist.pipeline.graph.flatten_model`.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> layer_order(keras.Model(inputs, keras.layers.Dense(2, name="b")(x)))
    ['a', 'b']
    """
    return pipeline_graph(model).names


def stage_layer_names(
    graph: LayerGraph, partition: Any, num_stages: int, virtual_stages: int = 1
) -> list[list[str]]:
    """Normalises a partition to one list of node names per stage.

    Args:
        graph: The model's `pipeline_graph`.
        partition: A `Partition`, a sequence of stage sizes (nodes per
            stage, in `graph.names` order), or a sequence of name lists.
        num_stages: The number of stages expected (with the interleaved
            schedule, the devices' stages times `virtual_stages`).
        virtual_stages: stages per device, for error messages. Defaults to `1`.

    Returns:
        The node names of each stage.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> m = keras.Model(inputs, keras.layers.Dense(2, name="b")(x))
    >>> stage_layer_names(pipeline_graph(m), [1, 1], 2)
    [['a'], ['b']]
    """
    order = graph.names
    if hasattr(partition, "stage_layer_names"):
        partition = partition.stage_layer_names
    partition = list(partition)
    if len(order) < num_stages:
        if virtual_stages > 1:
            raise ValueError(
                "The model has fewer layers than the interleaved schedule's "
                f"stages. Received: num_stages={num_stages // virtual_stages} x "
                f"virtual_stages={virtual_stages} = {num_stages} stages for a "
                f"model with {len(order)} layers. Use fewer stages or virtual "
                "stages, or the '1f1b' schedule."
            )
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
                f"{sum(partition)}) for a model with {len(order)} layers "
                f"{order}. Pass `partition='auto'` to choose the sizes "
                "automatically."
            )
        names, start = [], 0
        for size in partition:
            names.append(order[start : start + size])
            start += size
        return names
    names = [list(p) for p in partition]
    flat = [n for stage in names for n in stage]
    if sorted(flat) != sorted(order) or any(not stage for stage in names):
        missing = [n for n in order if n not in flat]
        extra = sorted(set(flat) - set(order))
        raise ValueError(
            "The partition must put every layer of the model in exactly one "
            f"non-empty stage. Received: missing layers {missing}, unknown "
            f"layers {extra}, {len(flat)} names for {len(order)} layers. "
            f"The layers are {order}."
        )
    return names


@dataclasses.dataclass(eq=False)
class Stage:
    """One pipeline stage: a slice of the model's graph on one device.

    A stage receives every tensor live across the cut before it and returns
    every tensor live across the cut after it; tensors that skip the stage
    are passed through on its device. It calls the wrapped model's own
    layers (none is copied), so the wrapped model stays exactly as it was
    and still saves as before.

    Attributes:
        index: The stage number, from 0.
        device: The TensorFlow device its ops and variables live on.
        layer_names: The graph nodes it computes, by name.
        nodes: The `GraphNode`s it runs, in topological order.
        in_keys: The keys of the tensors it receives.
        out_keys: The keys of the tensors it returns.
        layers: The Keras layers it holds.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> m = keras.Model(inputs, keras.layers.Dense(2, name="b")(x))
    >>> stages = split_model(pipeline_graph(m), [["a"], ["b"]], ["/CPU:0"] * 2)
    >>> [s.layer_names for s in stages]
    [('a',), ('b',)]
    """

    index: int
    device: str
    layer_names: tuple[str, ...]
    nodes: tuple[GraphNode, ...]
    in_keys: tuple[str, ...]
    out_keys: tuple[str, ...]
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
            ("pass", self.in_keys.index(k))
            if k in self.in_keys
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
        """Runs the stage on its inputs; returns its outputs in order.

        Args:
            inputs: One tensor per `in_keys` entry.
            training: Passed to the layers that take it. Defaults to `None`.

        Returns:
            One tensor per `out_keys` entry.
        """
        values: dict[str, Any] = dict(zip(self.in_keys, inputs))
        for node in self.nodes:
            values.update(zip(node.outputs, node.call(values, training=training)))
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
    graph: LayerGraph,
    names: Sequence[Sequence[str]],
    devices: Sequence[str],
) -> list[Stage]:
    """Cuts a model's graph into stages, one per list of node names.

    Args:
        graph: The model's `pipeline_graph`.
        names: The node names of each stage (see `stage_layer_names`).
        devices: The device of each stage.

    Returns:
        The stages. Stage 0 takes the model's inputs in order; the last stage
        returns the model's outputs in order.

    Raises:
        ValueError: a stage needs a tensor that only a later stage computes.

    Example:

    >>> inputs = keras.Input((4,))
    >>> x = keras.layers.Dense(3, name="a")(inputs)
    >>> m = keras.Model(inputs, keras.layers.Dense(2, name="b")(x + 1.0))
    >>> names = layer_order(m)  # 'a', the addition, 'b'
    >>> split_model(pipeline_graph(m), [names[:1], names[1:]], ["/CPU:0"] * 2)[1]
    Stage(index=1, device='/CPU:0', layers=['add...', 'b'], inputs=1, outputs=1)
    """
    stage_of = {n: s for s, stage in enumerate(names) for n in stage}
    num_stages = len(names)
    group_of = [stage_of[node.name] for node in graph.nodes]
    live = graph.live_across(group_of, num_stages)
    stages = []
    for s in range(num_stages):
        ins = graph.inputs if s == 0 else live[s - 1]
        outs = graph.outputs if s == num_stages - 1 else live[s]
        stage_nodes = tuple(n for n, g in zip(graph.nodes, group_of) if g == s)
        stages.append(
            Stage(
                index=s,
                device=devices[s],
                layer_names=tuple(n.name for n in stage_nodes),
                nodes=stage_nodes,
                in_keys=tuple(ins),
                out_keys=tuple(outs),
                layers=tuple(n.operation for n in stage_nodes if n.is_layer),
            )
        )
    return stages


def place_variables(stage: Stage) -> dict[Any, Any]:
    """Moves the stage's variables onto its device, keeping their values.

    The Keras variable objects stay the same (so the wrapped model, its
    weight order and its saved files do not change); only the TensorFlow
    variable behind each one is re-created on the stage's device.

    Args:
        stage: The stage whose variables to move.

    Returns:
        {the key an optimizer knew each variable by before the move: the
        variable}, to re-key what was set up with the old keys.

    Example:

    >>> moved = place_variables(stages[1])
    >>> stages[1].variables[0].value.device
    '/job:localhost/replica:0/task:0/device:CPU:0'
    """
    return {_compat.move_variable(variable, stage.device): variable
            for variable in stage.variables}
