"""Pipeline × data parallelism: one process per stage, several pipelines.

Run by every process of a job; with 4 processes and 2 stages, ranks [0, 1]
and [2, 3] are two pipelines (placement "cluster") that train as
data-parallel replicas, each on half of every global batch:

    python -m tf_smdist.launch --nproc 4 examples/pipeline_hybrid.py

Each process keeps its stage's variables and Adam state only; activations
travel forward and gradients backward between the stage processes, and each
stage's gradients are averaged over its data-parallel group. `get_weights`
and `save` assemble the whole model (every rank calls them; rank 0 writes).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

import tf_smdist as smd


def make_model() -> keras.Model:
    """A small functional MLP with a skip connection across the cut."""
    inputs = keras.Input((32,), name="features")
    h1 = keras.layers.Dense(64, activation="relu", name="h1")(inputs)
    h2 = keras.layers.Dense(64, activation="relu", name="h2")(h1)
    h3 = keras.layers.Dense(64, activation="relu", name="h3")(h2)
    joined = keras.layers.Add(name="skip")([h3, h1])
    outputs = keras.layers.Dense(10, name="logits")(joined)
    return keras.Model(inputs, outputs, name="skip_mlp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--placement", default="cluster")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--defer-weight-gradients", action="store_true",
        help="compute each stage's Dense weight gradients over many "
             "micro-batches at once (faster; holds every micro-batch's layer "
             "inputs)")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 32)).astype("float32")
    y = rng.integers(0, 10, 512)

    pipe = smd.PipelineModel(
        make_model(), num_stages=args.stages, microbatches=args.microbatches,
        schedule="1f1b", partition=[2, 3], placement=args.placement,
        defer_weight_gradients=args.defer_weight_gradients)
    rank = pipe.topology.rank if pipe.topology else 0
    print(f"rank {rank}: stage {pipe.stage_rank} of {pipe.stage_size}, "
          f"pipeline {pipe.dp_rank} of {pipe.dp_size}; pipeline ranks "
          f"{pipe.pipeline_ranks}, data-parallel group {pipe.dp_group_ranks}",
          flush=True)
    pipe.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    history = pipe.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0)
    print(f"rank {rank}: loss per epoch {history.history['loss']}", flush=True)
    # Bytes of this process's stage: its variables, their gradients and the
    # optimizer's slots (built by the first step), against the whole model's.
    print(f"rank {rank}: holds {pipe.memory_report()}", flush=True)

    weights = pipe.get_weights()  # the whole model, on every rank
    path = os.path.join(tempfile.gettempdir(), "pipeline_hybrid.keras")
    pipe.save(path)  # every rank gathers; rank 0 writes
    if rank == 0:
        plain = keras.models.load_model(path)
        same = all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), weights))
        print(f"rank 0: saved the whole model to {path}; it loads in plain "
              f"Keras with the trained weights: {same}", flush=True)
        os.remove(path)


if __name__ == "__main__":
    main()
