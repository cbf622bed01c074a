"""The MPI op library: collectives across processes, ordering, watchdog, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from mp_ops_worker import DTYPES, REDUCTIONS, expected_reduction
from mp_util import REPO, TESTS, launch, package_env, requires_mpi

from tf_smdist.data_parallel import cluster

WORKER = os.path.join(TESTS, "mp_ops_worker.py")


def _results(out_dir: str, size: int) -> list[dict]:
    results = []
    for r in range(size):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _expected_sum(dtype: str, size: int) -> np.ndarray:
    base = np.arange(1000, dtype=np.float64) / 7.0
    if dtype.startswith("int"):
        return sum(np.arange(1000) * (r + 1) for r in range(size)).astype(np.float64)
    np_type = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    parts = [(base * (r + 1)).astype(np_type) for r in range(size)]
    return sum(p.astype(np.float64) for p in parts)


@pytest.mark.slow
@requires_mpi
@pytest.mark.parametrize("nproc", [2, 3])
def test_collectives_across_processes(tmp_path, nproc):
    # The engine's ring from 256 KB (by default from 48 MiB / (processes - 1)),
    # so that the worker's 512 KB and 1 MB all-reduces take it.
    proc = launch(["--nproc", str(nproc), WORKER, "collectives", str(tmp_path)],
                  timeout=180, env={"SMDIST_MPI_RING_BYTES": "262144"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _results(str(tmp_path), nproc)
    for r, res in enumerate(results):
        assert (res["rank"], res["size"]) == (r, nproc)
        for dtype, base in (("int8", -100), ("uint8", 200)):
            values = [base + k for k in range(nproc)]
            wrapped = [int(np.array(sum(values)).astype(dtype)),
                       int(np.array(np.prod(values)).astype(dtype))]
            for n in (4 << 10, 512 << 10):
                assert res[f"wrap_{dtype}_{n}"] == [[wrapped[0]], [wrapped[1]]], (
                    dtype, n, res[f"wrap_{dtype}_{n}"], wrapped)
        for dtype in ("float32", "float64", "int32", "int64"):
            np.testing.assert_allclose(res[f"sum_{dtype}"],
                                       _expected_sum(dtype, nproc), rtol=1e-6)
        for dtype, ulp in (("float16", 2.0**-10), ("bfloat16", 2.0**-7)):
            # Rounded to 16 bits after each addition, in the order MPI's
            # algorithm adds (which varies by chunk), but identical on every
            # rank.
            np.testing.assert_array_equal(res[f"sum_{dtype}"],
                                          results[0][f"sum_{dtype}"])
            np.testing.assert_allclose(res[f"sum_{dtype}"],
                                       _expected_sum(dtype, nproc),
                                       rtol=2 * ulp * (nproc - 1), atol=1e-6)
        assert res["min"] == [0.0, -(nproc - 1.0), 5.0]
        assert res["max"] == [nproc - 1.0, 0.0, 5.0]
        assert res["empty"] == [0]
        last = float((256 << 10) + 2)
        assert res["ring"] == [0.0, last * sum(range(1, nproc + 1)), last * (r + 1)]
        assert res["bcast"] == [float(nproc - 1 + 10)] * 3
        assert res["bcast_bool"] == [True, False]
        assert res["gather"] == [f"r{i}" for i in range(nproc)]
        assert res["bcast_bytes"] == "from 1from 1"
        assert res["np_sum"] == [sum(range(nproc)), nproc]
        ranks = sum(range(nproc))
        for k, (a, b, c) in enumerate(res["steps"]):
            assert a == [nproc * k + ranks] * 4
            assert b == [2.0 * k * nproc] * 300
            assert c == [k * ranks] * 7
        assert res["native_ok"]
        _check_sub_communicators(res, r, nproc)
        _check_point_to_point(res, r, nproc)
        _check_gathers_and_scatters(res, r, nproc)
        _check_reductions(res, nproc)


def _check_sub_communicators(res: dict, r: int, n: int) -> None:
    evens, odds = list(range(0, n, 2)), list(range(1, n, 2))
    group = evens if r % 2 == 0 else odds
    # Ids are handed out in call order on every rank; -1 off the members.
    assert res["ids"] == [1 if r in evens else -1, 2 if r in odds else -1, 3]
    assert res["comm_rank_size"] == [group.index(r), len(group), n - 1 - r, n, r, n]
    assert res["sub_sum"] == [float(sum(k + 1 for k in group)), float(len(group))]
    assert res["sub_bcast"] == [float(group[-1])]
    assert res["sub_np"] == [max(group)]
    assert res["sub_gather"] == [str(k) * (k + 1) for k in group]
    assert res["sub_bcast_bytes"] == f"r{group[-1]}"
    assert res["sub_fn"] == [[float(sum(group))], [float(sum(range(n)))],
                             [2.0 * sum(range(n))]]
    assert "`group` must be in [0, 8)" in res["bad_group"]
    assert res["not_member"].startswith("InvalidArgumentError")
    assert "Received: comm=-1" in res["not_member"]
    # One rank passed another list: every rank names both lists.
    assert ("different rank lists: rank 0 passed ranks=[1, 0] but rank "
            f"{n - 1} passed ranks=[0, 1]") in res["mismatch"]
    assert "Received: ranks=[0, 0]" in res["bad_ranks"]
    assert res["destroyed"][0] == -1
    assert "Received: comm=3" in res["destroyed"][1]
    assert res["again"] == [4, [n]]


def _check_point_to_point(res: dict, r: int, n: int) -> None:
    ring = [float((r - 1) % n)] * 3
    if r == 0:
        assert res["p2p"] == [[[1.5, 1.5], [1.5, 1.5]], ring]
        assert "from rank 1 with tag 10 expected 4 elements" in res["short"]
        assert "the message holds 3 elements" in res["short"]
        assert res["short"].startswith("InvalidArgumentError")
    elif r == 1:
        assert res["p2p"] == [[7.0, 8.0], 1.0, ring]
        assert "from rank 0 with tag 9 expected 4 elements" in res["long"]
        assert "the message is larger" in res["long"]
        assert res["bytes"] == "hello"
    else:
        assert res["p2p"] == [ring]


def _check_gathers_and_scatters(res: dict, r: int, n: int) -> None:
    rows = [[float(k)] * 2 for k in range(n) for _ in range(k + 1)]
    assert res["allgather"] == rows
    assert res["allgather_fn"] == rows
    assert res["allgather_empty"] == [n - 1, 3]
    assert res["allgather_mismatch"].startswith("FailedPreconditionError")
    assert "rank 0 has rank 2 and 3 elements per row, rank 1 has rank 2 and 2" in (
        res["allgather_mismatch"])
    # d/dx of sum(gathered * row index): every rank's rows, summed over ranks.
    start = sum(k + 1 for k in range(r))
    assert res["allgather_grad"] == [[float(n * i)] * 2
                                     for i in range(start, start + r + 1)]
    assert res["alltoallv"] == [k * 100 + r for k in range(n) for _ in range(r + 1 + k)]
    counts = [k + 1 for k in range(n)]
    mine = np.arange(sum(counts))[sum(counts[:r]):sum(counts[:r + 1])]
    assert res["reduce_scatter"] == (mine * sum(range(1, n + 1))).tolist()
    assert res["reduce_scatter_max"] == (mine * n).tolist()


def _check_reductions(res: dict, n: int) -> None:
    for dtype in DTYPES:
        for reduction in REDUCTIONS:
            op, arr, op_dtype, arr_dtype = res[f"{dtype}_{reduction}"]
            expected = expected_reduction(dtype, reduction, n)
            assert op == expected, (dtype, reduction)
            assert arr == expected, (dtype, reduction)
            assert op_dtype == dtype
            assert arr_dtype == dtype
    # One rounding to nearest even per product (rank 2 contributes ones).
    a = np.array([1.1, 3.3, -7.7, 0.1], np.float32)
    for dtype in ("float16", "bfloat16"):
        t = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
        product = a.astype(t).astype(np.float32) * (a + 1).astype(t).astype(np.float32)
        assert res[f"round_{dtype}"] == product.astype(t).astype(np.float64).tolist()


def _failing_job(tmp_path, mode: str, nproc: int, timeout_s: int, ranks) -> tuple:
    """Launches a worker `mode` that ends with exit status 3 (a collective
    failed, as it should); each rank of `ranks`' results, and the launch."""
    proc = launch(["--nproc", str(nproc), WORKER, mode, str(tmp_path)], timeout=180,
                  env={"SMDIST_MPI_TIMEOUT": str(timeout_s)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    results = {}
    for r in ranks:
        with open(tmp_path / f"rank{r}.json") as f:
            results[r] = json.load(f)
    return results, proc


@pytest.mark.slow
@requires_mpi
def test_watchdog_names_the_stalled_rank(tmp_path):
    # Rank 1 stops issuing collectives. Rank 2 watches it (its predecessor in
    # the heartbeat ring); rank 0 learns it from the fact rank 2 passes on.
    results, proc = _failing_job(tmp_path, "stall", 3, 4, (0, 2))
    for r in (0, 2):
        assert f"did not complete within 4 s on rank {r} of 3" in results[r]["message"]
        # Never before its timeout; well before the launch's own timeout,
        # however loaded the machine (an upper bound, not a measurement).
        assert 4.0 <= results[r]["seconds"] < 120.0
    assert "Rank 1 is alive but has not joined this collective" in results[2]["message"]
    assert ("Rank 1 is alive but has not joined collective #2 of group 0 (it "
            "started 1; seen by rank 2)") in results[0]["message"]
    assert re.search(r"rank [02] failed with exit status 3", proc.stderr)


@pytest.mark.slow
@requires_mpi
def test_watchdog_names_a_stopped_rank_by_its_missing_heartbeats(tmp_path):
    results, _ = _failing_job(tmp_path, "stop", 3, 5, (0, 2))
    for r in (0, 2):
        assert f"did not complete within 5 s on rank {r} of 3" in results[r]["message"]
        assert "it is dead or stopped" in results[r]["message"]
    # Rank 2 saw it directly; rank 0 through the fact rank 2 sent round the ring.
    assert re.search(r"Rank 1 sent no heartbeat for at least \d+ s "
                     r"\(seen by rank 2\)", results[0]["message"])
    assert re.search(r"Rank 1 sent no heartbeat for \d+ s: it is dead or stopped",
                     results[2]["message"])


@pytest.mark.slow
@requires_mpi
def test_watchdog_names_the_stopped_peer_of_a_recv(tmp_path):
    res = _failing_job(tmp_path, "stop_recv", 2, 5, (0,))[0][0]
    assert ("recv 'SmdistMpiRecv' from rank 1 with tag 77 did not complete within 5 s "
            "on rank 0 of 2") in res["message"]
    assert "Rank 1 sent no heartbeat for" in res["message"]
    assert "it is dead or stopped" in res["message"]


@pytest.mark.slow
@requires_mpi
def test_a_broadcast_waits_past_the_deadline_for_a_live_root_only_when_told(tmp_path):
    # SMDIST_MPI_TIMEOUT=3; the root starts each broadcast 8 s late.
    results, _ = _failing_job(tmp_path, "patient", 3, 3, (1, 2))
    for r, res in results.items():
        # With timeout=60 the late root's data arrives after its 8 s of work.
        assert res["late_root"]["data"] == "from 0", res
        assert res["late_root"]["seconds"] >= 6.0
        # Without, the usual deadline fails the broadcast and names rank 0.
        message = res["late_root_usual"]["error"]
        assert f"did not complete within 3 s on rank {r} of 3" in message
        assert "has not joined" in message
        assert 3.0 <= res["late_root_usual"]["seconds"] < 60.0


@pytest.mark.slow
@requires_mpi
def test_a_longer_broadcast_timeout_still_fails_fast_on_a_stopped_root(tmp_path):
    # Rank 1, the root, is stopped: no heartbeats. timeout=120 must not keep
    # the others waiting: they fail once the usual 4 s have passed and the
    # silence names rank 1.
    results, _ = _failing_job(tmp_path, "patient_stop", 3, 4, (0, 2))
    for res in (results[r]["stopped_root"] for r in (0, 2)):
        assert "did not complete within 4 s" in res["error"], res
        assert "it is dead or stopped" in res["error"]
        assert 4.0 <= res["seconds"] < 60.0


def test_env_rank_and_size_reads_each_launcher():
    assert cluster.env_rank_and_size({}) == (0, 1)
    assert cluster.env_rank_and_size(
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}) == (2, 4)
    assert cluster.env_rank_and_size({"PMI_RANK": "1", "PMI_SIZE": "3"}) == (1, 3)
    assert cluster.env_rank_and_size(
        {"PMIX_RANK": "5", "SLURM_NTASKS": "8"}) == (5, 8)
    assert cluster.env_rank_and_size(
        {"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"}) == (0, 1)


def test_single_process_cluster_is_a_no_op():
    assert not cluster.is_multiprocess()
    assert cluster.initialize() == (0, 1)
    assert (cluster.rank(), cluster.size()) == (0, 1)
    cluster.handshake(what="bucket plan", digest="abc")
    v = tf.Variable([1.0, 2.0])
    cluster.broadcast_variables([v])
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(cluster.allreduce_numpy(np.array([3])), [3])
    cbs = [object()]
    assert cluster.rank_zero_writes(cbs) == cbs


def test_bad_timeout_from_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SMDIST_MPI_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SMDIST_MPI_TIMEOUT=.soon."):
        cluster._timeout_from_env()
    monkeypatch.setenv("SMDIST_MPI_TIMEOUT", "7.5")
    assert cluster._timeout_from_env() == 7.5


@requires_mpi
def test_allreduce_before_initialisation_is_a_clear_error():
    from tf_smdist import _mpi_ops

    with pytest.raises(tf.errors.FailedPreconditionError, match="not initialised"):
        _mpi_ops.host_allreduce(tf.ones([3]))


@requires_mpi
def test_allreduce_argument_errors():
    from tf_smdist import _mpi_ops

    with pytest.raises(ValueError, match="Received: reduction='mean'"):
        _mpi_ops.host_allreduce(tf.ones([3]), reduction="mean")
    with pytest.raises(ValueError, match="Received: group=64"):
        _mpi_ops.host_allreduce(tf.ones([3]), group=64)
    with pytest.raises(ValueError, match="Received: index=2, group_size=2"):
        _mpi_ops.host_allreduce(tf.ones([3]), index=2, group_size=2)
    with pytest.raises(TypeError, match="Received: dtype=complex64"):
        _mpi_ops.allreduce_array(np.ones(2, np.complex64))


def test_missing_library_names_the_packages_to_install(monkeypatch, tmp_path):
    from tf_smdist import _mpi_ops

    monkeypatch.setattr(_mpi_ops, "_ops", None)
    monkeypatch.setattr(_mpi_ops, "_path", lambda: str(tmp_path / "missing.so"))
    with pytest.raises(ImportError, match="apt-get install openmpi-bin libopenmpi-dev"):
        _mpi_ops.load_library()


def test_cluster_docstring_examples_run():
    import doctest

    failures, tried = doctest.testmod(
        cluster, extraglobs={"np": np, "tf": tf}, optionflags=doctest.ELLIPSIS)
    assert tried > 0
    assert failures == 0


def _header_enum(text: str, name: str) -> dict[str, int]:
    body = re.search(r"enum class " + name + r" : int \{(.*?)\};", text, re.S).group(1)
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"\bk(\w+) = (\d+)", body)}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def test_python_tables_match_the_comm_header():
    from tf_smdist import _mpi_ops

    with open(os.path.join(REPO, "kernels", "mpi", "comm.h")) as f:
        text = f.read()
    dtypes = {_snake(k): v for k, v in _header_enum(text, "DataType").items()}
    assert {k.replace("b_float16", "bfloat16"): v for k, v in dtypes.items()} == (
        _mpi_ops._DTYPES)
    assert {_snake(k): v for k, v in _header_enum(text, "Reduction").items()} == (
        _mpi_ops._REDUCTIONS)
    assert {_snake(k): v for k, v in _header_enum(text, "Kind").items()} == (
        _mpi_ops._KINDS)
    codes = {_snake(k): v for k, v in _header_enum(text, "Code").items()}
    assert codes.pop("ok") == 0
    errors = {"invalid_argument": tf.errors.InvalidArgumentError,
              "deadline_exceeded": tf.errors.DeadlineExceededError,
              "failed_precondition": tf.errors.FailedPreconditionError,
              "internal": tf.errors.InternalError}
    assert {v: errors[k] for k, v in codes.items()} == _mpi_ops._ERRORS
    for name, value in (("kMaxGroups", _mpi_ops.MAX_GROUPS),
                        ("kMaxSubGroups", _mpi_ops.MAX_SUB_GROUPS)):
        assert re.search(rf"constexpr int {name} = (\d+);", text).group(1) == str(value)
    assert "constexpr int kMaxTag = (1 << 20) - 1;" in text
    assert _mpi_ops.MAX_TAG == (1 << 20) - 1


@requires_mpi
def test_loads_exactly_the_mpi_library_it_was_built_against():
    from tf_smdist import _build_info

    recorded = _build_info.MPI_LIBRARY
    assert os.path.isabs(recorded) and os.path.exists(recorded), recorded
    code = (
        "from tf_smdist import _mpi_ops\n"
        "_mpi_ops.load_library()\n"
        "paths = {line.split()[-1] for line in open('/proc/self/maps')\n"
        "         if '/libmpi.so' in line}\n"
        "import json; print(json.dumps(sorted(paths)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=package_env(), cwd=TESTS,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [os.path.realpath(recorded)]


def test_missing_recorded_mpi_library_falls_back_with_a_warning(monkeypatch, caplog):
    from tf_smdist import _mpi_ops

    opened = []
    monkeypatch.setattr(_mpi_ops, "_recorded_mpi_library",
                        lambda: "/nonexistent/libmpi.so.40")
    monkeypatch.setattr(_mpi_ops, "_find_mpi_library", lambda: "libmpi.so.40")
    monkeypatch.setattr(_mpi_ops, "_open_global", opened.append)
    with caplog.at_level("WARNING", logger="tf_smdist._mpi_ops"):
        _mpi_ops._preload_mpi()
    assert opened == ["libmpi.so.40"]
    assert "/nonexistent/libmpi.so.40" in caplog.text
    assert "was built against" in caplog.text
