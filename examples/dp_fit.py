"""Keras `model.fit` under `smd.DataParallelStrategy` on scikit-learn's digits.

The 1,797 8x8 handwritten digits ship inside scikit-learn (no download).
A small MLP trains data-parallel on the local devices (all GPUs, or the host
CPU split into logical devices), its gradients summed on the host CPU in
fusion buckets; it reaches 96.4% test accuracy in 30 epochs on 2 logical CPU
devices (the script exits with an error below 95%).

Usage:
    pip install scikit-learn
    python examples/dp_fit.py [--replicas 2] [--epochs 30] [--compression fp16]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_smdist as smd  # noqa: E402

REQUIRED_ACCURACY = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--compression", choices=["fp16", "bf16"], default=None)
    args = parser.parse_args()

    # Split the CPU before TensorFlow starts (ignored when GPUs are present:
    # the strategy then uses all GPUs).
    smd.configure_cpu_devices(args.replicas)

    import keras
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    keras.utils.set_random_seed(0)

    strategy = smd.DataParallelStrategy(
        bucket_cap_mb=args.bucket_cap_mb, compression=args.compression
    )
    print(f"{strategy!r}: {strategy.num_replicas_in_sync} replicas")
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dropout(0.1),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    model.fit(
        x_train,
        y_train,
        batch_size=32 * strategy.num_replicas_in_sync,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=2,
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    predicted = np.argmax(model.predict(x_test, verbose=0), axis=1)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f}")
    print("first test digits:", y_test[:10], "predicted:", predicted[:10])
    if accuracy < REQUIRED_ACCURACY:
        raise SystemExit(
            f"test accuracy {accuracy:.4f} is below the expected {REQUIRED_ACCURACY}"
        )


if __name__ == "__main__":
    main()
