"""The pipeline modules' docstring examples run, and print what they show."""

import doctest
import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_smdist as smd

MODULES = (
    "tf_smdist.pipeline.schedule",
    "tf_smdist.pipeline.solver",
    "tf_smdist.pipeline.profile",
    "tf_smdist.pipeline.serialization",
    "tf_smdist.pipeline.cost_model",
    "tf_smdist.pipeline.partition",
    "tf_smdist.pipeline.graph",
    "tf_smdist.pipeline.stages",
    "tf_smdist.pipeline.profiler",
    "tf_smdist.pipeline.callback",
    "tf_smdist.pipeline.execution",
    "tf_smdist.pipeline.plot",
)


@pytest.fixture(scope="module")
def namespace():
    """The names the examples use without defining them.

    `model`: a compiled 5-layer MLP (`dense` .. `dense_4`, 32 inputs);
    `x`, `y`: a batch of 64; `profile`, `part`, `cost_model`, `graph` and
    `stages` (2 stages on `/CPU:0`) of that model.
    """
    from tf_smdist.pipeline.cost_model import CostModel
    from tf_smdist.pipeline.graph import flatten_model
    from tf_smdist.pipeline.stages import pipeline_graph, split_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(32, name="dense")]
        + [keras.layers.Dense(32, name=f"dense_{i}") for i in (1, 2, 3)]
        + [keras.layers.Dense(8, name="dense_4")]
    )
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((64, 32), "float32")
    y = np.zeros((64, 8), "float32")
    profile = smd.profile_model(model, x[:32], warmup=1, repeats=1)
    return {
        "smd": smd,
        "keras": keras,
        "np": np,
        "tf": tf,
        "model": model,
        "x": x,
        "y": y,
        "profile": profile,
        "part": smd.partition(profile, 2),
        "cost_model": CostModel(profile, 2, microbatches=4),
        "graph": flatten_model(model),
        "stages": split_model(
            pipeline_graph(model),
            [["dense", "dense_1"], ["dense_2", "dense_3", "dense_4"]],
            ["/CPU:0", "/CPU:0"],
        ),
    }


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Examples save files in the working directory.
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(
        module,
        extraglobs=dict(namespace),
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        report=True,
    )
    assert tried > 0, name
    assert failures == 0, name
