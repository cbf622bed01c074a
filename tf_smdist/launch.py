"""Multi-process launcher: runs a training script on N processes over `mpirun`.

Usage:

    python -m tf_smdist.launch --nproc 2 train.py --epochs 3
    python -m tf_smdist.launch --nproc 4 --cpus-per-proc 4 train.py
    python -m tf_smdist.launch --hosts node1:2,node2:2 train.py

It runs `mpirun` with sensible defaults -- each process bound to its own
cores, root allowed when run as root, the environment forwarded to remote
hosts -- prefixes every output line with the rank that printed it, forwards
SIGINT/SIGTERM, exits with the exit code of the first rank that failed
(128 + N for a rank killed by signal N) and leaves no process behind.
Plain `mpirun -np N python train.py` works too.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

__all__ = ["build_command", "main", "parse_hosts"]

_log = logging.getLogger("tf_smdist.launch")

_TAG_ANY = re.compile(r"\[(\d+),(\d+)\]<(stdout|stderr)>:")
_FAILED_RANK = re.compile(
    r"Process name:\s*\[\[\d+,\d+\],(\d+)\]\s*\n\s*Exit code:\s*(\d+)")
_SIGNALED_RANK = re.compile(
    r"process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)")
# Environment variables forwarded to every rank (remote hosts included).
_FORWARD_PREFIXES = ("SMDIST_", "TF_", "PYTHON", "OMP_", "KERAS_", "CUDA_",
                     "NCCL_", "XLA_")
_FORWARD_NAMES = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "HOME")
_GRACE_S = 10.0
# Each rank runs the script with line-buffered output, so that mpirun reads
# (and tags) whole lines, and as `python script.py` would: the script as
# `__main__`, its arguments in `sys.argv`, its directory first on `sys.path`.
_RANK_BOOT = (
    "import runpy, sys; sys.argv = sys.argv[1:]; "
    "sys.stdout.reconfigure(line_buffering=True); "
    "sys.stderr.reconfigure(line_buffering=True); "
    "sys.path[0] = __import__('os').path.dirname("
    "__import__('os').path.abspath(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def parse_hosts(hosts: str) -> list[tuple[str, int]]:
    """Parses `"h1:2,h2:2"` into `[("h1", 2), ("h2", 2)]`.

    Args:
        hosts: comma-separated `host:slots` entries (`host` alone is 1 slot).

    Returns:
        The (host, slots) pairs in order.

    Raises:
        ValueError: an entry is malformed or has a non-positive slot count.

    Example:
    >>> parse_hosts("node1:2,node2:4")
    [('node1', 2), ('node2', 4)]
    """
    out = []
    for entry in hosts.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, _, slots = entry.partition(":")
        try:
            n = int(slots) if slots else 1
        except ValueError:
            n = -1
        if not name or n < 1:
            raise ValueError(
                "`--hosts` entries must look like host:slots with slots >= 1. "
                f"Received: hosts={hosts!r}. Example: --hosts node1:2,node2:2")
        out.append((name, n))
    if not out:
        raise ValueError(f"`--hosts` names no host. Received: hosts={hosts!r}")
    return out


def build_command(
    script_and_args: Sequence[str],
    *,
    nproc: int | None = None,
    cpus_per_proc: int | None = None,
    hosts: str | None = None,
    mpirun: str = "mpirun",
    python: str = sys.executable,
    extra_mpirun_args: Sequence[str] = (),
    environ: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Returns the `mpirun` command line and environment for a job.

    Args:
        script_and_args: the Python script and its arguments.
        nproc: number of processes. Defaults to the total slots of `hosts`,
            else `1`.
        cpus_per_proc: cores bound to each process. Defaults to the host's
            cores divided by the processes on it (no binding if fewer cores
            than processes).
        hosts: `"h1:n,h2:n"`; `None` runs everything on this host.
            Defaults to `None`.
        mpirun: the `mpirun` executable. Defaults to `"mpirun"`.
        python: the interpreter each rank runs. Defaults to this one.
        extra_mpirun_args: passed to `mpirun` before the program.
            Defaults to `()`.
        environ: the base environment. Defaults to `os.environ`.

    Returns:
        `(argv, env)` for `subprocess.Popen`.

    Example:
    >>> argv, env = build_command(["train.py"], nproc=2, cpus_per_proc=1)
    >>> argv[argv.index("-np") + 1]
    '2'
    """
    if not script_and_args:
        raise ValueError(
            "No script to run. Received: script_and_args=[]. "
            "Usage: python -m tf_smdist.launch --nproc 2 train.py [args...]")
    host_list = parse_hosts(hosts) if hosts else None
    total_slots = sum(n for _, n in host_list) if host_list else None
    if nproc is None:
        nproc = total_slots or 1
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(
            f"`nproc` must be a positive integer. Received: nproc={nproc!r}")
    if cpus_per_proc is not None and cpus_per_proc < 1:
        raise ValueError(
            "`cpus_per_proc` must be a positive integer. "
            f"Received: cpus_per_proc={cpus_per_proc!r}")
    env = dict(os.environ if environ is None else environ)
    argv = [mpirun, "-np", str(nproc), "--tag-output"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    if host_list:
        argv += ["--host", ",".join(f"{h}:{n}" for h, n in host_list)]
        if nproc > total_slots:
            argv.append("--oversubscribe")
        per_host = max(n for _, n in host_list)
        cores = None  # unknown on remote hosts
    else:
        argv += ["--host", f"localhost:{nproc}"]
        per_host = nproc
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    if cpus_per_proc is None and cores is not None:
        cpus_per_proc = cores // per_host if cores >= per_host else None
    fits = cores is None or (cpus_per_proc or 0) * per_host <= cores
    if cpus_per_proc is not None and fits:
        argv += ["--map-by", f"slot:PE={cpus_per_proc}", "--bind-to", "core"]
    else:
        argv += ["--bind-to", "none", "--oversubscribe"]
    forwarded = sorted(
        k for k in env
        if k.startswith(_FORWARD_PREFIXES) or k in _FORWARD_NAMES)
    for k in forwarded:
        argv += ["-x", k]
    argv += list(extra_mpirun_args)
    argv += [python, "-c", _RANK_BOOT] + list(script_and_args)
    return argv, env


def _become_subreaper() -> None:
    # Orphaned rank processes are re-parented to the launcher, which then
    # kills and reaps them, so nothing outlives it (Linux only).
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    out, todo = [], _children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _kill_leftovers() -> None:
    me = os.getpid()
    for _ in range(50):
        pids = _descendants(me)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.01)
            except ChildProcessError:
                break


class _Demux:
    """Turns mpirun's tagged output into whole lines prefixed with the rank.

    mpirun tags every chunk a rank writes (`[job,rank]<stdout>:`), so a line
    written in pieces arrives with several tags, possibly interleaved with
    another rank's pieces; the pieces are joined per (rank, stream) and each
    line is written once it is complete.
    """

    def __init__(self, lock: threading.Lock, tail: list[str]) -> None:
        self._lock = lock
        self._tail = tail
        self._partial: dict[tuple[str, str], str] = {}

    def feed(self, line: str, default_out: IO[str]) -> None:
        pieces = _TAG_ANY.split(line)
        # re.split with 3 groups: [untagged, job, rank, stream, text, ...]
        if pieces[0]:
            self._emit(default_out, pieces[0], record=True)
        for k in range(1, len(pieces), 4):
            rank, stream, text = pieces[k + 1], pieces[k + 2], pieces[k + 3]
            buf = self._partial.pop((rank, stream), "") + text
            *complete, rest = buf.split("\n")
            out = sys.stdout if stream == "stdout" else sys.stderr
            for c in complete:
                self._emit(out, f"[rank {rank}] {c}\n")
            if rest:
                self._partial[(rank, stream)] = rest

    def flush(self) -> None:
        for (rank, stream), rest in sorted(self._partial.items()):
            out = sys.stdout if stream == "stdout" else sys.stderr
            self._emit(out, f"[rank {rank}] {rest}\n")
        self._partial.clear()

    def _emit(self, out: IO[str], text: str, record: bool = False) -> None:
        with self._lock:
            if record:
                self._tail.append(text)
                del self._tail[:-200]
            out.write(text)
            out.flush()


def _pump(stream: IO[str], default_out: IO[str], demux: _Demux) -> None:
    for line in stream:
        demux.feed(line, default_out)


def _failed_rank(mpirun_output: str) -> tuple[int, int] | None:
    """(rank, exit status for the launcher) of the first failed rank."""
    m = _SIGNALED_RANK.search(mpirun_output)
    if m:
        return int(m.group(1)), 128 + int(m.group(2))
    m = _FAILED_RANK.search(mpirun_output)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


def run(argv: Sequence[str], env: dict[str, str]) -> int:
    """Runs the `mpirun` command `argv`; returns the job's exit status.

    Example:
    >>> run(*build_command(["train.py"], nproc=2))  # doctest: +SKIP
    0
    """
    _become_subreaper()
    proc = subprocess.Popen(
        list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1, start_new_session=True)
    tail: list[str] = []
    demux = _Demux(threading.Lock(), tail)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, demux),
                         daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, demux),
                         daemon=True),
    ]
    for t in pumps:
        t.start()
    received: list[tuple[int, float]] = []

    def forward(signum: int, _frame: object) -> None:
        received.append((signum, time.monotonic()))
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > _GRACE_S:
                    _log.warning(
                        "mpirun did not stop %.0f s after a signal; killing it",
                        _GRACE_S)
                    os.killpg(proc.pid, signal.SIGKILL)
                    _kill_leftovers()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
        demux.flush()
        _kill_leftovers()
    output = "".join(tail)
    failed = _failed_rank(output)
    if received:
        signum = received[0][0]
        sys.stderr.write(f"tf_smdist.launch: stopped by signal {signum}\n")
        return 128 + signum
    if failed is not None:
        rank, status = failed
        sys.stderr.write(
            f"tf_smdist.launch: rank {rank} failed with exit status {status}\n")
        return status
    if code < 0:
        return 128 - code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (`python -m tf_smdist.launch`).

    Example:
    >>> main(["--nproc", "2", "train.py"])  # doctest: +SKIP
    0
    """
    parser = argparse.ArgumentParser(
        prog="python -m tf_smdist.launch",
        description="Run a tf_smdist training script on several processes "
                    "(wraps mpirun).")
    parser.add_argument("--nproc", type=int, default=None,
                        help="number of processes "
                             "(default: the slots of --hosts, else 1)")
    parser.add_argument("--cpus-per-proc", type=int, default=None,
                        help="cores bound to each process "
                             "(default: cores / processes)")
    parser.add_argument("--hosts", default=None,
                        help="host:slots list, e.g. node1:2,node2:2 "
                             "(default: this host)")
    parser.add_argument("--mpirun", default=shutil.which("mpirun") or "mpirun",
                        help="the mpirun executable")
    parser.add_argument("--mpirun-args", default="",
                        help="extra mpirun arguments, one quoted string")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the mpirun command and exit")
    parser.add_argument("script", help="the Python training script")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="arguments of the script")
    ns = parser.parse_args(argv)
    try:
        cmd, env = build_command(
            [ns.script] + ns.args, nproc=ns.nproc, cpus_per_proc=ns.cpus_per_proc,
            hosts=ns.hosts, mpirun=ns.mpirun,
            extra_mpirun_args=shlex.split(ns.mpirun_args))
    except ValueError as e:
        parser.error(str(e))
    if ns.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which(cmd[0]) is None:
        sys.stderr.write(
            f"tf_smdist.launch: `{cmd[0]}` was not found. Install Open MPI "
            "(`apt-get install openmpi-bin libopenmpi-dev`) or pass --mpirun.\n")
        return 127
    return run(cmd, env)


if __name__ == "__main__":
    sys.exit(main())
