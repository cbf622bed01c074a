"""Does the communication thread's polling steal a core from TensorFlow?

While requests are in flight, the MPI communication thread polls MPI_Test,
yielding the core between polls for `SMDIST_MPI_SPIN_US` microseconds after
the last activity (and about as long as a large transfer should take), then
sleeping 50 us between polls. This script measures the training throughput
of 2 processes, each pinned to one core, running the data-parallel MLP of
`bench_dp_multiprocess.py` (custom loop, `DataParallelStrategy`) with each
spin setting, in interleaved rounds, and prints the medians and their ratio
against the default (2000 us). The machine's load average is printed too: on
a shared machine the spread between rounds is the noise floor.

Usage:
    python benchmarks/bench_mpi_spin.py [--spins 0,2000] [--rounds 5]
        [--steps 30] [--windows 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_dp_multiprocess as dp  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spins", default="0,2000", help="SMDIST_MPI_SPIN_US values")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--model", default="mlp")
    args = p.parse_args()
    spins = [int(s) for s in args.spins.split(",")]
    rates: dict[int, list[float]] = {s: [] for s in spins}
    loads = []
    worker = ["--strategy", "smd", "--model", args.model, "--steps", str(args.steps),
              "--windows", str(args.windows), "--warmup", "5", "--batch", "128"]
    for k in range(args.rounds):
        for spin in spins:
            os.environ["SMDIST_MPI_SPIN_US"] = str(spin)
            loads.append(os.getloadavg()[0])
            res = dp._launch(2, worker, timeout=1200)
            rates[spin].append(statistics.median(res["rates"]))
            print(f"round {k}: spin {spin:5d} us: {rates[spin][-1]:9.0f} samples/s "
                  f"(load {loads[-1]:.1f})", flush=True)
    base = 2000 if 2000 in spins else spins[-1]
    print()
    print(f"| SMDIST_MPI_SPIN_US | median samples/s | min | max | vs {base} us |")
    print("|---|---|---|---|---|")
    for spin in spins:
        med = statistics.median(rates[spin])
        print(f"| {spin} | {med:,.0f} | {min(rates[spin]):,.0f} | "
              f"{max(rates[spin]):,.0f} | {med / statistics.median(rates[base]):.3f} |")
    print("load average (1 min) during the runs: median "
          f"{statistics.median(loads):.1f}, range {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
