"""A Keras model's layer graph, flattened into one topologically ordered list.

Sequential and functional models are expanded recursively (a nested
Sequential or functional model contributes its own layers, named
`outer/inner`); any other layer, including a subclassed model used as a
layer, is one node. Each node knows the tensors it consumes and produces, by
key, so a contiguous run of nodes can be executed on its own (one pipeline
stage) and the tensors live across any cut can be listed (skip connections).

Keras 3 has no public API for a functional model's call graph; the few
private attributes read here (`_nodes_by_depth`, `_keras_history`,
`_call_context_args`, `_outputs_struct`) are Keras', not TensorFlow's, and
are read only in this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import keras

__all__ = [
    "GraphNode",
    "LayerGraph",
    "SubclassedModelError",
    "flatten_model",
    "output_structure",
]


class SubclassedModelError(ValueError):
    """Raised for a model whose layer graph cannot be read (subclassed)."""


@dataclasses.dataclass(frozen=True)
class GraphNode:
    """One call of one Keras layer (or operation) in a flattened model graph.

    Args:
        name: Unique name; `outer/inner` for layers of nested models, and
            `name#k` for the k-th extra call of a shared layer.
        operation: The Keras layer or operation that is called.
        inputs: Keys of the tensors consumed, in the call's flat order.
        outputs: Keys of the tensors produced, in flat order.
        arguments: Keras' symbolic call arguments of this call (internal).
        key_of: Maps `id(KerasTensor)` in `arguments` to tensor keys
            (internal).

    Example:

    >>> graph = flatten_model(keras.Sequential([keras.Input((3,)),
    ...                                         keras.layers.Dense(2, name="a")]))
    >>> graph.nodes[0].outputs
    ('a:0',)
    """

    name: str
    operation: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    arguments: Any = dataclasses.field(repr=False, compare=False, default=None)
    key_of: Mapping[int, str] = dataclasses.field(
        repr=False, compare=False, default_factory=dict
    )

    @property
    def is_layer(self) -> bool:
        """Whether the operation is a `keras.layers.Layer` (may own weights)."""
        return isinstance(self.operation, keras.layers.Layer)

    def call(self, values: Mapping[str, Any], *, training: bool | None = None) -> list:
        """Runs this node on concrete tensors.

        Args:
            values: Maps tensor keys (at least `self.inputs`) to tensors.
            training: Passed to layers whose `call` takes `training`.
                Defaults to `None` (the layer's default).

        Returns:
            The flat list of output tensors, matching `self.outputs`.

        Example:

        >>> node = graph.nodes[0]
        >>> [tuple(t.shape) for t in node.call({graph.inputs[0]: x})]
        [(64, 32)]
        """
        if self.arguments is None:  # A layer of a Sequential chain.
            args, kwargs = (values[self.inputs[0]],), {}
        else:

            def fill(x: Any) -> Any:
                if isinstance(x, keras.KerasTensor):
                    return values[self.key_of[id(x)]]
                return x

            args, kwargs = self.arguments.convert(fill)
        if training is not None and "training" in getattr(
            self.operation, "_call_context_args", ()
        ):
            kwargs = dict(kwargs, training=training)
        return list(keras.tree.flatten(self.operation(*args, **kwargs)))


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    """A model's layers as a topologically ordered list of `GraphNode`s.

    Args:
        nodes: The nodes, in an order where every node's inputs are produced
            by earlier nodes or are model inputs.
        inputs: Keys of the model's inputs, in `model.inputs` flat order.
        outputs: Keys of the model's outputs, in flat order.

    Example:

    >>> graph = flatten_model(model)
    >>> [node.name for node in graph.nodes]
    ['dense', 'dense_1', 'dense_2', 'dense_3', 'dense_4']
    """

    nodes: tuple[GraphNode, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """The node names, in order."""
        return [node.name for node in self.nodes]

    def live_after(self) -> list[list[str]]:
        """The tensor keys live across each cut.

        Entry `i` lists the tensors produced by nodes `0..i` (or model inputs)
        that a node after `i` consumes or that are model outputs, in order of
        first production; these are what a cut between node `i` and `i + 1`
        must carry.

        Returns:
            One list of keys per node (the last one holds only model outputs).

        Example:

        >>> graph = flatten_model(keras.Sequential([keras.Input((3,)),
        ...                                         keras.layers.Dense(2, name="a")]))
        >>> graph.live_after()
        [['a:0']]
        """
        return self.live_across(range(len(self.nodes)), len(self.nodes))

    def live_across(self, group_of: Sequence[int], num_groups: int) -> list[list[str]]:
        """The tensor keys live across each cut between groups of nodes.

        Nodes are assigned to groups `0..num_groups - 1` (pipeline stages)
        so that no node consumes a tensor of a later group. Entry `g` lists
        the tensors produced in groups `0..g` (or model inputs) that a later
        group consumes or that are model outputs, in order of production.

        Args:
            group_of: The group of each node, in node order.
            num_groups: The number of groups.

        Returns:
            One list of keys per group (the last one holds only model
            outputs).

        Raises:
            ValueError: when a node consumes a tensor of a later group.

        Example:

        >>> graph.live_across([0, 0, 1, 1, 1], 2)  # two stages of a chain
        [['dense_1:0'], ['dense_4:0']]
        """
        producer = dict.fromkeys(self.inputs, -1)
        last_use: dict[str, int] = {}
        for node, group in zip(self.nodes, group_of):
            for key in node.inputs:
                if producer[key] > group:
                    raise ValueError(
                        f"{node.name!r} is in stage {group} but needs a tensor "
                        f"computed in stage {producer[key]}. Received: a "
                        "partition that is not in the model's data-flow order. "
                        "Give each stage a contiguous slice of the layer order."
                    )
                last_use[key] = max(last_use.get(key, -1), group)
            for key in node.outputs:
                producer[key] = group
        for key in self.outputs:
            last_use[key] = num_groups
        order = list(producer)  # Production order: inputs, then node outputs.
        return [
            [k for k in order if producer[k] <= g < last_use.get(k, -1)]
            for g in range(num_groups)
        ]

    def run(
        self,
        inputs: Sequence[Any],
        *,
        start: int = 0,
        stop: int | None = None,
        values: Mapping[str, Any] | None = None,
        training: bool | None = None,
    ) -> dict[str, Any]:
        """Runs nodes `[start, stop)` and returns every tensor by key.

        Args:
            inputs: The model's flat inputs (ignored keys may be missing when
                `values` already holds what the nodes need).
            start: First node to run. Defaults to `0`.
            stop: One past the last node to run. Defaults to `None` (all).
            values: Tensors already known, by key (for example the tensors
                live across the cut before `start`). Defaults to `None`.
            training: Passed to layers taking `training`. Defaults to `None`.

        Returns:
            A dict from tensor key to tensor, including the given ones.

        Example:

        >>> values = graph.run([x])
        >>> y = values[graph.outputs[0]]
        """
        known = dict(zip(self.inputs, inputs))
        known.update(values or {})
        for node in self.nodes[start:stop]:
            known.update(zip(node.outputs, node.call(known, training=training)))
        return known


def _is_functional(model: Any) -> bool:
    return isinstance(model, keras.Model) and hasattr(model, "_nodes_by_depth")


def _subclassed_error(model: Any) -> SubclassedModelError:
    return SubclassedModelError(
        f"Cannot read the layer graph of `{type(model).__name__}`: it is a "
        "subclassed model, whose `call()` is Python code, so its layers and "
        "the tensors between them are unknown to the profiler and the "
        f"partitioner. Received: model={model.name!r} of type "
        f"{type(model).__name__}. Rebuild it as a keras.Sequential or "
        "functional model, or split it manually: wrap one layer (or model) "
        "per pipeline stage in keras.Sequential([stage_0, stage_1, ...]) and "
        "pass manual stage sizes (for example `partition=[1, 1, ...]`, or "
        "`smd.partition(profile, K, stage_sizes=[1, 1, ...])`)."
    )


class _Flattener:
    """Builds the flat node list; one instance per `flatten_model` call."""

    def __init__(self, expand_nested: bool) -> None:
        self.expand_nested = expand_nested
        self.nodes: list[GraphNode] = []
        self.used_names: set[str] = set()

    def unique(self, name: str) -> str:
        candidate, k = name, 0
        while candidate in self.used_names:
            k += 1
            candidate = f"{name}#{k}"
        self.used_names.add(candidate)
        return candidate

    def expand(self, model: Any, prefix: str, input_keys: list[str]) -> list[str]:
        """Appends `model`'s nodes; returns the keys of its flat outputs."""
        if isinstance(model, keras.Sequential):
            keys = input_keys
            for layer in model.layers:  # Each returns a single tensor.
                keys = self.call_layer(layer, prefix, keys, 1, None, {})
            return keys
        # Functional: Keras' own execution order (by decreasing depth).
        key_of = {id(t): k for t, k in zip(model.inputs, input_keys)}
        by_depth = model._nodes_by_depth
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                if node.operation is None or node.is_input:
                    continue
                in_keys = [key_of[id(t)] for t in node.input_tensors]
                out_keys = self.call_layer(
                    node.operation,
                    prefix,
                    in_keys,
                    len(node.outputs),
                    node.arguments,
                    {id(t): key_of[id(t)] for t in node.input_tensors},
                )
                for tensor, key in zip(node.outputs, out_keys):
                    key_of[id(tensor)] = key
        return [key_of[id(t)] for t in model.outputs]

    def call_layer(
        self,
        operation: Any,
        prefix: str,
        in_keys: list[str],
        num_outputs: int,
        arguments: Any,
        key_of: Mapping[int, str],
    ) -> list[str]:
        """Appends one call of `operation` (expanding nested models)."""
        name = self.unique(prefix + operation.name)
        nested = self.expand_nested and (
            isinstance(operation, keras.Sequential) or _is_functional(operation)
        )
        # A nested model called with extra options (say training=False) stays
        # whole, so those options keep applying to it.
        options = {} if arguments is None else arguments.kwargs
        if nested and all(value is None for value in options.values()):
            return self.expand(operation, name + "/", list(in_keys))
        out_keys = [f"{name}:{i}" for i in range(num_outputs)]
        self.nodes.append(
            GraphNode(
                name=name,
                operation=operation,
                inputs=tuple(dict.fromkeys(in_keys)),
                outputs=tuple(out_keys),
                arguments=arguments,
                key_of=key_of,
            )
        )
        return out_keys


def flatten_model(model: Any, *, expand_nested: bool = True) -> LayerGraph:
    """Flattens a built Sequential or functional model into a `LayerGraph`.

    Nested Sequential and functional models are expanded into their layers;
    other layers (including subclassed models used as layers) stay whole.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.
        expand_nested: Whether nested Sequential and functional models
            contribute their own layers (named `outer/inner`) rather than
            being one node. Defaults to `True`.

    Returns:
        The `LayerGraph`: nodes in topological order, input and output keys.

    Raises:
        SubclassedModelError: (a `ValueError`) for a subclassed model, with
            the manual-split remedy.
        ValueError: for a Sequential model that is not built yet.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="a"),
    ...                           keras.layers.Dense(2, name="b")])
    >>> flatten_model(model).names
    ['a', 'b']
    """
    if isinstance(model, keras.Sequential):
        try:
            inputs = list(model.inputs)
        except (AttributeError, ValueError):
            inputs = []
        if not inputs:
            raise ValueError(
                f"Sequential model {model.name!r} is not built, so its input "
                f"shape is unknown. Received: model={model.name!r}. Call it "
                "on a batch, or start it with keras.Input(shape)."
            )
    elif _is_functional(model):
        inputs = list(model.inputs)
    else:
        raise _subclassed_error(model)
    input_keys = [f"{t._keras_history.operation.name}:0" for t in inputs]
    flattener = _Flattener(expand_nested)
    output_keys = flattener.expand(model, "", input_keys)
    return LayerGraph(
        nodes=tuple(flattener.nodes),
        inputs=tuple(input_keys),
        outputs=tuple(output_keys),
    )


def output_structure(model: Any) -> Any:
    """The nesting of a model's outputs, to pack flat output tensors into.

    Args:
        model: A built Sequential or functional model.

    Returns:
        A structure of the model's symbolic outputs (one tensor, a list or a
        dict), as `model(x)` returns them.

    Example:

    >>> keras.tree.pack_sequence_as(output_structure(model), [x]).shape
    (64, 32)
    """
    # A functional model keeps the nesting of its outputs in `_outputs_struct`
    # (no public accessor); a Sequential model returns one tensor.
    struct = getattr(model, "_outputs_struct", None)
    if struct is None:
        struct = model.outputs
    # As Keras' functional call does (unpack_singleton): outputs given as a
    # one-element list come back as the tensor itself.
    if isinstance(struct, (list, tuple)) and len(struct) == 1:
        return struct[0]
    return struct
