"""Train a model larger than one device's memory budget as a 4-stage pipeline.

The MLP below needs about 4 x its parameter bytes for parameters, gradients
and Adam's two moments: more than the per-device budget, so it must be
split. `PipelineModel` with `partition="auto"` runs the first batch on an
equal split, profiles the layers (time, parameter, activation and optimizer
bytes), solves for the fastest split that fits the budget on every device,
moves the layers and continues training pipelined with the 1F1B schedule.

Run:
    python examples/pipeline_fit.py [--budget-mb 40] [--out pipeline_schedule.png]
"""

from __future__ import annotations

import argparse
import logging

import tf_smdist as smd

smd.configure_cpu_devices(4)

import keras  # noqa: E402
import numpy as np  # noqa: E402


def make_model() -> keras.Model:
    """An uneven MLP: wide layers early, narrow ones late."""
    widths = [1024, 1024, 1024, 768, 768, 512, 512, 256, 256, 128, 64, 10]
    inputs = keras.Input((256,), name="features")
    x = inputs
    for i, width in enumerate(widths[:-1]):
        x = keras.layers.Dense(width, activation="relu", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(widths[-1], name="logits")(x)
    return keras.Model(inputs, outputs, name="uneven_mlp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=40.0)
    parser.add_argument("--out", default="pipeline_schedule.png")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    keras.utils.set_random_seed(0)
    model = make_model()
    param_mb = sum(w.size for w in model.get_weights()) * 4 / 2**20
    print(
        f"model: {param_mb:.1f} MB of parameters, about {4 * param_mb:.0f} MB "
        f"with gradients and Adam state; budget {args.budget_mb:.0f} MB per "
        "device"
    )

    pipe = smd.PipelineModel(
        model,
        num_stages=4,
        microbatches=8,
        schedule="1f1b",
        partition="auto",
        partition_options={"memory_capacity": args.budget_mb * 2**20},
    )
    pipe.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.RandomState(0)
    x = rng.randn(2048, 256).astype("float32")
    y = rng.randint(0, 10, size=2048)
    pipe.fit(
        x,
        y,
        batch_size=128,
        epochs=args.epochs,
        callbacks=[smd.ProfilingCallback(batch_size=128)],
        verbose=2,
    )
    print(pipe.partition_report())
    print(pipe.pipeline_schedule.table())
    smd.plot_schedule(pipe, path=args.out)
    print(f"schedule picture: {args.out}")
    loss, accuracy = pipe.evaluate(x, y, batch_size=128, verbose=0)
    print(f"final loss {loss:.4f}, accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
