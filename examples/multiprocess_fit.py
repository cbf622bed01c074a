"""Keras `model.fit` on several processes with `smd.DataParallelStrategy` over MPI.

Every process runs this same script; the launcher starts them:

    python -m tf_smdist.launch --nproc 2 examples/multiprocess_fit.py
    python -m tf_smdist.launch --nproc 2 examples/multiprocess_fit.py --local-devices 2
    mpirun -np 2 python examples/multiprocess_fit.py      # plain mpirun works too

Each process trains replicas on its local devices (GPUs, or the host CPU split
into logical devices); gradients are summed on each host, then across the
processes over MPI. The global batch is split across all replicas of all
processes and the dataset is sharded by rank automatically. Rank 0 broadcasts
its initial weights and alone writes the backup (BackupAndRestore): stop the
job and start it again with the same command, and it resumes. It trains an MLP
on scikit-learn's 8x8 digits (no download) and exits with an error below 95%
test accuracy.

Usage:
    pip install scikit-learn
    python -m tf_smdist.launch --nproc 2 examples/multiprocess_fit.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_smdist as smd  # noqa: E402

REQUIRED_ACCURACY = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-devices", type=int, default=1,
                        help="logical CPU devices per process")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--backup-dir", default=os.path.join(
        tempfile.gettempdir(), "tf_smdist_multiprocess_fit_backup"))
    args = parser.parse_args()
    smd.configure_cpu_devices(args.local_devices)

    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from tf_smdist.data_parallel import cluster

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y)
    keras.utils.set_random_seed(0)

    strategy = smd.DataParallelStrategy()
    rank, size = cluster.rank(), cluster.size()
    if rank == 0:
        print(f"{size} processes, {strategy.num_replicas_in_sync} replicas in sync")
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ])
        model.compile(optimizer=keras.optimizers.Adam(2e-3),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = cluster.rank_zero_writes(
        [keras.callbacks.BackupAndRestore(args.backup_dir)])
    model.fit(x_train, y_train, batch_size=32 * strategy.num_replicas_in_sync,
              epochs=args.epochs, callbacks=callbacks, verbose=2 if rank == 0 else 0)
    # evaluate's metrics are global: every rank prints the same numbers.
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"rank {rank}: test loss {loss:.4f}, test accuracy {accuracy:.4f}")
    if accuracy < REQUIRED_ACCURACY:
        raise SystemExit(
            f"test accuracy {accuracy:.4f} is below the expected {REQUIRED_ACCURACY}")


if __name__ == "__main__":
    main()
