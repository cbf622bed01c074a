"""Helpers of the multi-process tests: run the launcher with a deadline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

import pytest

import tf_smdist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
# Where the tested tf_smdist lives (the source tree, or site-packages after
# `pip install .`): the ranks import the same one.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(tf_smdist.__file__)))


def mpi_available() -> bool:
    return (shutil.which("mpirun") is not None
            and os.path.exists(os.path.join(PACKAGE_PARENT, "tf_smdist",
                                            "libsmdist_mpi.so")))


requires_mpi = pytest.mark.skipif(
    not mpi_available(),
    reason="needs Open MPI (apt-get install openmpi-bin libopenmpi-dev) and the "
           "MPI op library (python setup.py build_ext --inplace)")


def package_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that must import the tested tf_smdist.

    Run the child with `cwd=TESTS`: `python -c`/`-m` put the working directory
    first on `sys.path`, so a child started in the repository root would import
    the source tree (without compiled libraries when the package is installed)
    instead of the tested package.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def launch(
    args: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Runs `python -m tf_smdist.launch ARGS`; kills its session on timeout."""
    full_env = package_env(**(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_smdist.launch", *args], cwd=TESTS, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"launcher did not finish within {timeout} s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def pids_alive(pids: Sequence[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive
