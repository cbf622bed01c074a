"""The multi-process launcher: command line, rank prefixes, exit codes, signals."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mp_util import TESTS, launch, package_env, pids_alive, requires_mpi

from tf_smdist import launch as launcher


def test_build_command_binds_each_process_to_its_cores():
    argv, _ = launcher.build_command(["train.py", "--lr", "0.1"], nproc=2,
                                     cpus_per_proc=1, mpirun="mpirun",
                                     python="python3", environ={})
    assert argv[:4] == ["mpirun", "-np", "2", "--tag-output"]
    assert argv[argv.index("--map-by") + 1] == "slot:PE=1"
    assert argv[argv.index("--bind-to") + 1] == "core"
    assert argv[-3:] == ["train.py", "--lr", "0.1"]
    assert argv[argv.index("python3") + 1] == "-c"


def test_build_command_without_enough_cores_does_not_bind():
    cores = len(os.sched_getaffinity(0))
    argv, _ = launcher.build_command(["t.py"], nproc=cores + 1, environ={})
    assert argv[argv.index("--bind-to") + 1] == "none"
    assert "--oversubscribe" in argv


def test_build_command_allows_root_only_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    _, env = launcher.build_command(["t.py"], nproc=2, environ={})
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"
    assert env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    _, env = launcher.build_command(["t.py"], nproc=2, environ={})
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env


def test_build_command_forwards_the_environment_to_remote_hosts():
    argv, _ = launcher.build_command(
        ["t.py"], hosts="node1:2,node2:2", mpirun="mpirun",
        environ={"PYTHONPATH": "/src", "SMDIST_MPI_TIMEOUT": "30", "SECRET": "x"})
    assert argv[argv.index("-np") + 1] == "4"
    assert argv[argv.index("--host") + 1] == "node1:2,node2:2"
    forwarded = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert forwarded == ["PYTHONPATH", "SMDIST_MPI_TIMEOUT"]


def test_parse_hosts_and_errors():
    assert launcher.parse_hosts("a:2, b") == [("a", 2), ("b", 1)]
    with pytest.raises(ValueError, match="Received: hosts='a:0'"):
        launcher.parse_hosts("a:0")
    with pytest.raises(ValueError, match="Received: nproc=0"):
        launcher.build_command(["t.py"], nproc=0, environ={})
    with pytest.raises(ValueError, match="Received: script_and_args=\\[\\]"):
        launcher.build_command([], nproc=2, environ={})


def test_dry_run_prints_the_mpirun_command(capsys):
    assert launcher.main(["--nproc", "2", "--mpirun", "mpirun", "--dry-run",
                          "train.py", "--epochs", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mpirun -np 2 --tag-output")
    assert line.endswith("train.py --epochs 3")


def test_failed_rank_is_read_from_mpirun_messages():
    exited = ("  Process name: [[9042,1],1]\n  Exit code:    3\n")
    assert launcher._failed_rank(exited) == (1, 3)
    signaled = ("mpirun noticed that process rank 2 with PID 123 on node h exited "
                "on signal 9 (Killed).")
    assert launcher._failed_rank(signaled) == (2, 137)
    assert launcher._failed_rank("all good") is None


def test_demux_joins_pieces_of_a_line_per_rank(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    demux = launcher._Demux(threading.Lock(), [])
    demux.feed("[1,1]<stderr>:Trace[1,0]<stderr>:other line\n", sys.stderr)
    demux.feed("[1,1]<stderr>:back\n", sys.stderr)
    demux.feed("[1,0]<stdout>:hello[1,0]<stdout>: 0\n", sys.stdout)
    demux.feed("mpirun message\n", sys.stderr)
    demux.feed("[1,1]<stdout>:unterminated", sys.stdout)
    demux.flush()
    assert err.getvalue() == ("[rank 0] other line\n[rank 1] Traceback\n"
                              "mpirun message\n")
    assert out.getvalue() == "[rank 0] hello 0\n[rank 1] unterminated\n"


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    print("hello from", rank)
    print("to stderr", rank, file=sys.stderr)
    mode = sys.argv[1]
    if mode == "pids":
        with open(os.path.join(sys.argv[2], f"pid{rank}"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    if mode == "fail" and rank == 1:
        sys.exit(3)
    if mode == "kill" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode != "ok":
        time.sleep(600)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(_SCRIPT)
    return str(path)


@pytest.mark.slow
@requires_mpi
def test_output_is_prefixed_with_the_rank(script):
    proc = launch(["--nproc", "2", script, "ok"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "[rank 0] hello from 0" in lines
    assert "[rank 1] hello from 1" in lines
    assert "[rank 1] to stderr 1" in proc.stderr.splitlines()


@pytest.mark.slow
@requires_mpi
def test_failing_rank_exit_code_is_propagated(script):
    proc = launch(["--nproc", "2", script, "fail"], timeout=120)
    assert proc.returncode == 3
    assert "tf_smdist.launch: rank 1 failed with exit status 3" in proc.stderr


@pytest.mark.slow
@requires_mpi
def test_rank_killed_by_a_signal_gives_128_plus_signal(script):
    start = time.monotonic()
    proc = launch(["--nproc", "3", script, "kill"], timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "rank 1 failed with exit status 137" in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
@requires_mpi
def test_sigterm_is_forwarded_and_no_rank_survives(script, tmp_path):
    env = package_env(TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tf_smdist.launch", "--nproc", "2", script, "pids",
         str(tmp_path)], env=env, cwd=TESTS, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert time.monotonic() < deadline, "ranks did not start"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in pid_files]
        assert pids_alive(pids) == pids
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
        assert "stopped by signal 15" in err
        deadline = time.monotonic() + 10
        while pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pids_alive(pids) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_launch_docstring_examples_run():
    import doctest

    failures, tried = doctest.testmod(launcher)
    assert tried > 0
    assert failures == 0
