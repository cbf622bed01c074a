"""Measuring this machine for the planner: `calibrate` and the α-β fit."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from tf_smdist.planner.cluster import Cluster

__all__ = ["calibrate", "fit_alpha_beta"]

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (4096, 65536, 1 << 20, 4 << 20, 16 << 20)


def fit_alpha_beta(
    nbytes: Sequence[float], seconds: Sequence[float]
) -> tuple[float, float]:
    """Least-squares fit of `seconds ≈ a + b · nbytes`, with `a, b >= 0`.

    Args:
        nbytes: Message sizes.
        seconds: Measured times, one per size.

    Returns:
        `(a, b)`: seconds of fixed cost and seconds per byte.

    Example:

    >>> fit_alpha_beta([0, 1e6, 2e6], [1e-5, 1.01e-3, 2.01e-3])
    (1e-05, 1e-09)
    """
    x = np.asarray(nbytes, np.float64)
    y = np.asarray(seconds, np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(
            "Need at least two (size, time) points of equal count. Received: "
            f"{x.size} sizes, {y.size} times."
        )
    # Absolute errors: the large messages set the bandwidth; the fixed
    # cost is then what the smallest message leaves over.
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    if b <= 0:
        b = float(y.max() / max(x.max(), 1.0))
    smallest = int(np.argmin(x))
    if not 0 <= a <= y[smallest]:
        a = max(0.0, float(y[smallest] - b * x[smallest]))
    return float(a), float(b)


def calibrate(
    processes: int = 2,
    *,
    path: str | os.PathLike | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 5,
    host_bytes: int = 16 << 20,
    cores: int | None = None,
    timeout: float = 600.0,
) -> Cluster:
    """Measures this machine with `processes` processes as the devices.

    Launches `python -m tf_smdist.launch --nproc N` on a worker that times,
    for each message size: an all-reduce between all the processes (through
    the communication thread, as the strategy's buckets go), and round trips
    between ranks 0 and 1 with the `send`/`recv` ops in a `tf.function` (the
    pipeline's path; half a round trip is one message). Rank 0 also
    times the `host_reduce` op (two `host_bytes` float32 buffers), a memory copy,
    a 512×512 matmul and an empty `tf.function` call.

    The all-reduce times are fitted to the ring formula
    `2(p-1)α + 2(p-1)/p · n/B`, the messages to `α + n/B` (least squares
    on absolute times, so the large messages set the bandwidth). The
    processes share this host's cores: with more processes than cores,
    `compute_slots = cores` (at most that many compute at full speed at
    once; profile the model on one core).
    Communication and compute share each process's core: `overlap=0`.

    Args:
        processes: Number of processes, at least 2. Defaults to `2`.
        path: Where to write the cluster's JSON. Defaults to `None`.
        sizes: Message sizes in bytes (multiples of 4). Defaults to
            4 KiB, 64 KiB, 1 MiB, 4 MiB and 16 MiB.
        repeats: Timed windows per size (the median counts). Defaults to `5`.
        host_bytes: Bytes of each buffer the host-reduce and copy timings
            use. Defaults to `16 MiB`.
        cores: Cores of this machine. Defaults to `None` (those this process
            may run on).
        timeout: Seconds before the job is killed. Defaults to `600.0`.

    Returns:
        A `Cluster` of `processes` nodes of one device each (each process
        has its own host buffers; MPI between them plays the network; the
        bucket packing copies play the device-to-host copies); `metadata`
        keeps the raw timings and the matmul speed (`matmul_flops`) to
        compare devices.

    Raises:
        ValueError: for `processes < 2` or bad sizes.
        RuntimeError: when the job fails (its output is in the message).

    Example:

    >>> local = calibrate(2, path="local.json")
    >>> Cluster.load("local.json") == local
    True
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 2:
        raise ValueError(
            "Calibration measures between processes: `processes` must be an "
            f"integer >= 2. Received: processes={processes!r}"
        )
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s < 4 or s % 4 for s in sizes):
        raise ValueError(
            "`sizes` must hold at least two byte counts, each a positive "
            f"multiple of 4. Received: sizes={sizes}"
        )
    if path is not None:
        # Checked before the minutes of measuring, not after.
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                "The folder of `path` does not exist. Received: "
                f"path={os.fspath(path)!r}. Create {folder!r} first, or pass "
                "another path."
            )
    if cores is None:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    raw = _run_job(processes, sizes, repeats, int(host_bytes), timeout)
    cluster = _cluster_from(raw, processes, cores)
    if path is not None:
        cluster.save(path)
    return cluster


def _run_job(
    processes: int, sizes: list[int], repeats: int, host_bytes: int, timeout: float
) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    worker = os.path.join(here, "_calibrate_worker.py")
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(worker)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "calibration.json")
        cmd = [
            sys.executable, "-m", "tf_smdist.launch", "--nproc", str(processes),
            worker, "--out", out, "--sizes", ",".join(map(str, sizes)),
            "--repeats", str(repeats), "--host-bytes", str(host_bytes),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = package_parent + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise RuntimeError(
                f"Calibration did not finish within {timeout} s. Received: "
                f"processes={processes}. Output:\n{stdout[-2000:]}\n{stderr[-2000:]}"
            ) from None
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(
                f"Calibration job failed with exit status {proc.returncode}. "
                f"Received: command={' '.join(cmd)}. Check that Open MPI and the "
                f"op libraries are installed. Output:\n{stdout[-2000:]}\n"
                f"{stderr[-2000:]}"
            )
        with open(out) as f:
            return json.load(f)


def _cluster_from(raw: dict, processes: int, cores: int) -> Cluster:
    p = processes
    sizes = sorted(int(k) for k in raw["allreduce"])
    a, b = fit_alpha_beta(sizes, [raw["allreduce"][str(s)] for s in sizes])
    # Ring: a = 2(p-1)·α, b = 2(p-1)/p / B.
    latency = a / (2 * (p - 1))
    bandwidth = 2 * (p - 1) / p / b
    pa, pb = fit_alpha_beta(sizes, [raw["p2p"][str(s)] for s in sizes])
    memory = _total_memory()
    # Each process is a "node" of one device: its host buffers are its own,
    # and MPI between the processes plays the network.
    return Cluster(
        nodes=p,
        devices_per_node=1,
        device_memory=memory / p,
        intra_node_bandwidth=bandwidth,
        inter_node_bandwidth=bandwidth,
        latency=latency,
        host_reduce_bandwidth=raw["host_reduce_bandwidth"],
        # Packing a bucket into (and out of) its host buffer is a copy into
        # a new tensor (timed as the strategy does it; older calibration
        # files have only the copy into a warm buffer).
        device_host_bandwidth=raw.get("pack_bandwidth", raw["memory_bandwidth"] / 2),
        p2p_bandwidth=1.0 / pb,
        p2p_latency=pa,
        memory_bandwidth=raw["memory_bandwidth"],
        compute_slots=float(cores) if p > cores else None,
        task_overhead=raw["call_overhead"],
        overlap=0.0,
        metadata={
            "calibrated": True,
            "processes": p,
            "cores": cores,
            "p2p": raw.get("p2p_method", "broadcast_bytes from rank 0"),
            "matmul_flops": raw["matmul_flops"],
            "allreduce_s": raw["allreduce"],
            "p2p_s": raw["p2p"],
            "native_allreduce_s": raw["native_allreduce"],
        },
    )


def _total_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8e9
