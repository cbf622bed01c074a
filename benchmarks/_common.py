"""What the multi-process benchmarks share: the models, the launch, the ranks' results.

Import it from a script in this directory (`python benchmarks/bench_x.py` and the
launcher both put the script's directory first on `sys.path`):

    import _common
    result = _common.launch(__file__, 2, ["--mode", "dp"], timeout=600)

A benchmark script runs itself twice: once as the driver, and once per rank
under `python -m tf_smdist.launch` with `--worker --out PATH` added to its
arguments. The ranks write their results with `write_result`; the driver reads
rank 0's (or every rank's) with `launch`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

__all__ = [
    "REPO",
    "data",
    "launch",
    "launch_with_ports",
    "load_text",
    "model",
    "package_parent",
    "write_result",
]


def model(name: str) -> tuple[Any, tuple[int, ...]]:
    """A seeded Keras model of the benchmarks and its input shape (no batch).

    Names: `"mlp"` (784 -> 384 -> 256 -> 10, ~0.4 M parameters), `"wide_mlp"`
    (1024 -> 2048 -> 2048 -> 10, ~6.3 M parameters) and `"convnet"` (three
    convolutions, ~30 k parameters, ~0.15 GFLOP per sample).
    """
    import keras

    keras.utils.set_random_seed(0)
    if name == "mlp":
        return keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(384, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]), (784,)
    if name == "wide_mlp":
        return keras.Sequential([
            keras.Input((1024,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10),
        ]), (1024,)
    if name == "convnet":
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]), (32, 32, 3)
    raise ValueError(f"Unknown model {name!r}. Use mlp, wide_mlp or convnet.")


def data(shape: Sequence[int], n: int, classes: int = 10) -> tuple[Any, Any]:
    """`n` seeded float32 samples of `shape` and integer labels below `classes`."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return x, y


def package_parent() -> str:
    """The directory holding the `tf_smdist` the driver imports.

    The ranks get it first on `PYTHONPATH`, so they import the same package
    (the checkout with its built libraries, or an installed one).
    """
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import tf_smdist

    return os.path.dirname(os.path.dirname(os.path.abspath(tf_smdist.__file__)))


def load_text() -> str:
    """The load average, for the lines printed around timed runs."""
    one, five, _ = os.getloadavg()
    return (f"load average {one:.2f} (1 min), {five:.2f} (5 min) "
            f"on {os.cpu_count()} cores")


def write_result(out: str, result: Any, *, rank: int, every_rank: bool = False) -> None:
    """A rank's side of `launch`: rank 0 writes `result` to `out` as JSON.

    With `every_rank=True` every rank writes `out.<rank>` as well, which
    `launch(..., every_rank=True)` reads.
    """
    if every_rank:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


class LaunchError(RuntimeError):
    """The job failed before rank 0 wrote its result; carries the job's output."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def launch(
    script: str,
    nproc: int,
    worker_args: Sequence[str],
    *,
    timeout: float,
    cpus_per_proc: int | None = 1,
    every_rank: bool = False,
    env: dict[str, str] | None = None,
) -> Any:
    """Runs `script --worker --out PATH ARGS` on `nproc` ranks; returns the result.

    The job runs under `python -m tf_smdist.launch` in its own session, which
    is killed whole if it outlives `timeout` seconds. A job that exits with an
    error after rank 0 wrote its result (a rank's late failure at shutdown)
    still returns the result, and says so.

    Args:
        script: The benchmark script (its `__file__`).
        nproc: Processes.
        worker_args: Arguments for the ranks, after `--worker --out PATH`.
        timeout: Seconds before the job is killed.
        cpus_per_proc: Cores bound to each process, or `None` for the
            launcher's default (no binding when processes outnumber cores).
            Defaults to `1`; ignored when `nproc` exceeds the cores.
        every_rank: Return every rank's result (`[rank 0, rank 1, ...]`),
            written with `write_result(..., every_rank=True)`.
        env: Extra environment variables for the ranks.

    Returns:
        Rank 0's JSON result, or the list of every rank's.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "tf_smdist.launch", "--nproc", str(nproc)]
        if cpus_per_proc and nproc * cpus_per_proc <= (os.cpu_count() or 1):
            cmd += ["--cpus-per-proc", str(cpus_per_proc)]
        cmd += [os.path.abspath(script), "--worker", "--out", out, *worker_args]
        full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
        full_env["PYTHONPATH"] = (package_parent() + os.pathsep
                                  + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise LaunchError(f"{' '.join(cmd)} ran past {timeout} s:\n"
                              f"{output[-3000:]}", output) from None
        if not os.path.exists(out):
            raise LaunchError(f"{' '.join(cmd)} failed (exit status "
                              f"{proc.returncode}):\n{output[-3000:]}", output)
        if proc.returncode != 0:
            print(f"  (exit status {proc.returncode} after writing results: "
                  f"{output.strip().splitlines()[-1:]})", flush=True)
        if not every_rank:
            with open(out) as f:
                return json.load(f)
        results = []
        for r in range(nproc):
            with open(f"{out}.{r}") as f:
                results.append(json.load(f))
        return results


def _unused_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _lost_port(text: str) -> bool:
    text = text.lower()
    return "address already in use" in text or ("port" in text and "bind" in text)


def launch_with_ports(
    script: str,
    nproc: int,
    worker_args: Callable[[list[int]], Sequence[str]],
    *,
    timeout: float,
    attempts: int = 3,
    **kwargs: Any,
) -> Any:
    """`launch` for workers that listen on TCP ports (TensorFlow servers).

    A port found free here can be taken by another process before the worker
    binds it; a job that fails that way starts again on new ports, up to
    `attempts` times. Any other failure is raised at once.

    Args:
        script: The benchmark script.
        nproc: Processes.
        worker_args: Builds the ranks' arguments from `nproc` free ports.
        timeout: Seconds per attempt.
        attempts: Tries. Defaults to `3`.
        **kwargs: Passed to `launch`.
    """
    for attempt in range(attempts):
        try:
            return launch(script, nproc, worker_args(_unused_ports(nproc)),
                          timeout=timeout, **kwargs)
        except LaunchError as error:
            if attempt + 1 == attempts or not _lost_port(error.output):
                raise
            print("  (a port was taken before the worker bound it; "
                  "starting again on new ports)", flush=True)
    raise AssertionError("unreachable")
