"""The `tf-smdist-plan` console script: a profile and a cluster in, layouts out.

Usage:

    tf-smdist-plan profile.json --cluster cluster.json --global-batch 2048
    tf-smdist-plan profile.json --nodes 64 --devices-per-node 8 \\
        --device-memory 80e9 --intra-node-bandwidth 300e9 \\
        --inter-node-bandwidth 12.5e9 --global-batch 2048 --png scaling.png

Prints the table of layouts (best first) and, with `--png`, draws the
predicted scaling efficiency against the device count (1, 2, 4, ... nodes at
the same per-device batch) for each aggregation algorithm.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tf_smdist.pipeline.profile import Profile
from tf_smdist.planner.cluster import _FIELDS, Cluster
from tf_smdist.planner.costs import AGGREGATIONS
from tf_smdist.planner.model import SCHEDULES
from tf_smdist.planner.search import Plan, plan

__all__ = ["main", "scaling_curves"]


def scaling_curves(
    profile: Profile,
    cluster: Cluster,
    *,
    per_device_batch: int,
    **fixed: object,
) -> dict[str, list[tuple[int, float]]]:
    """Predicted efficiency of the best layout at 1, 2, 4 ... nodes.

    The global batch grows with the devices (weak scaling, as data-parallel
    scaling results are reported).

    Args:
        profile: The model's `Profile`.
        cluster: The full cluster; fewer nodes of it are planned too.
        per_device_batch: Samples per device per step.
        **fixed: Dimensions to fix, as for `plan`.

    Returns:
        `{aggregation: [(devices, efficiency), ...]}`.

    Example:

    >>> scaling_curves(profile, cluster, per_device_batch=32)["ring"][0]
    (8, 0.97)
    """
    node_counts = sorted({1, cluster.nodes} | {
        2**i for i in range(cluster.nodes.bit_length()) if 2**i <= cluster.nodes})
    curves: dict[str, list[tuple[int, float]]] = {}
    for aggregation in AGGREGATIONS:
        points = []
        for nodes in node_counts:
            sub = cluster.replace(nodes=nodes)
            result = plan(
                profile, sub, global_batch=per_device_batch * sub.num_devices,
                aggregation=aggregation, **fixed,
            )
            feasible = [r for r in result.rows if r.feasible]
            if feasible:
                points.append((sub.num_devices, feasible[0].efficiency))
        curves[aggregation] = points
    return curves


def _plot(curves: dict[str, list[tuple[int, float]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for aggregation, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=aggregation)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted scaling efficiency")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tf-smdist-plan",
        description="Predict and rank data-parallel x pipeline layouts of a "
                    "profiled model on a cluster (SI units).")
    p.add_argument("profile", help="profile JSON (smd.Profile.save)")
    p.add_argument("--pipeline-profile", default=None,
                   help="the same model profiled as the pipeline trains "
                        "(smd.profile_model(..., matmul_rule=True)), JSON: "
                        "prices layouts with 2 or more stages")
    p.add_argument("--cluster", help="cluster JSON (smd.Cluster.save or "
                                     "Cluster.calibrate); options below override it")
    for name, kind in _FIELDS:
        p.add_argument("--" + name.replace("_", "-"), dest=name,
                       type=int if kind == "count" else float, default=None)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--data-parallel", type=int, default=None)
    p.add_argument("--pipeline-stages", type=int, default=None)
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument("--schedule", default=None, choices=SCHEDULES)
    p.add_argument("--virtual-stages", type=int, default=None,
                   help="stages per device of the interleaved schedule")
    p.add_argument("--aggregation", default=None, choices=AGGREGATIONS)
    p.add_argument("--top", type=int, default=20, help="rows shown (0: all)")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.add_argument("--png", default=None,
                   help="write predicted efficiency vs devices per aggregation")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of `tf-smdist-plan`.

    Example:

    >>> main(["profile.json", "--cluster", "local.json", "--global-batch", "64"])
    0
    """
    args = _parser().parse_args(argv)
    try:
        profile = Profile.load(args.profile)
        extra = ({"pipeline_profile": Profile.load(args.pipeline_profile)}
                 if args.pipeline_profile else {})
        options = {name: getattr(args, name) for name, _ in _FIELDS
                   if getattr(args, name) is not None}
        if args.cluster:
            cluster = Cluster.load(args.cluster).replace(**options)
        else:
            required = ("nodes", "devices_per_node", "device_memory",
                        "intra_node_bandwidth", "inter_node_bandwidth")
            missing = [n for n in required if n not in options]
            if missing:
                raise ValueError(
                    "Describe the cluster with --cluster FILE or with "
                    + ", ".join("--" + n.replace("_", "-") for n in required)
                    + f". Received: no value for {missing}.")
            cluster = Cluster(**options)
        fixed = {
            key: getattr(args, key)
            for key in ("data_parallel", "pipeline_stages", "microbatches", "schedule",
                        "virtual_stages")
            if getattr(args, key) is not None
        }
        result: Plan = plan(profile, cluster, global_batch=args.global_batch,
                            aggregation=args.aggregation, **fixed, **extra)
    except (ValueError, TypeError, OSError, KeyError) as error:
        sys.stderr.write(f"tf-smdist-plan: {error}\n")
        return 2
    sys.stdout.write(result.table(limit=args.top or None) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    if args.png:
        per_device = max(1, args.global_batch // cluster.num_devices)
        curves = scaling_curves(profile, cluster, per_device_batch=per_device,
                                **{k: v for k, v in fixed.items()
                                   if k in ("schedule", "virtual_stages")},
                                **extra)
        _plot(curves, args.png,
              f"{profile.model_name or 'model'}, {per_device} samples/device")
        sys.stdout.write(f"wrote {args.png}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
