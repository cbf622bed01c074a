"""The planner against published scaling results: inputs, figures, errors.

Each case rebuilds a published set-up from the hardware, model and batch
figures its source gives, fills what the source does not give with a stated
assumption, predicts it with `plan`, and compares. `reproduce()` returns the
rows; `markdown()` the README table. Published figures are quoted from:

- Horovod's README and docs/benchmarks.rst (Sergeev & Del Balso, 2018):
  128 servers x 4 Pascal GPUs, RoCE-capable 25 Gbit/s network,
  `tf_cnn_benchmarks --batch_size 64`: scaling efficiency 90% for
  Inception V3 and ResNet-101, 68% for VGG-16 (512 GPUs).
- Herring (Thangakrishnan et al., SC20), abstract: BERT-large, 85% scaling
  efficiency with up to 2048 NVIDIA V100 GPUs (on EFA).
- GPipe (Huang et al., NeurIPS 2019), Table 2, AmoebaNet-D (18, 256)
  throughput normalised to K=2, M=1 (as quoted by torchgpipe's
  docs/benchmarks.rst, which also gives its own Tesla P40 reproduction).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tf_smdist.pipeline.profile import LayerProfile, Profile
from tf_smdist.planner.cluster import Cluster
from tf_smdist.planner.search import plan

__all__ = ["ASSUMPTIONS", "PublishedRow", "markdown", "reproduce"]

GBIT = 1e9 / 8

# Inputs the sources do not state, with why each value was chosen.
ASSUMPTIONS: dict[str, str] = {
    "P100 images/s (one GPU, fp32, batch 64)": (
        "Inception V3 142, ResNet-101 130, VGG-16 154: the order of "
        "TensorFlow's published tf_cnn_benchmarks P100 figures (ResNet-101 "
        "interpolated between ResNet-50 and ResNet-152); not from the Horovod "
        "sources"),
    "parameters": (
        "Inception V3 23.9 M, ResNet-101 44.5 M, VGG-16 138.4 M, BERT-large "
        "340 M (the models' usual sizes); fp32 gradients for the CNNs"),
    "Horovod intra-node link": "10 GB/s (PCIe 3 x16 between the 4 GPUs)",
    "Horovod network": ("25 Gbit/s at line rate, 10 µs per message; NCCL's flat "
                        "ring over all 512 GPUs (Horovod's default then); 64 MiB "
                        "fusion buffer (Horovod's default); full overlap"),
    "BERT-large step (one V100)": (
        "64 sequences in 0.32 s (200 sequences/s, mixed precision, sequence "
        "length 128); fp16 gradients (680 MB)"),
    "Herring node (p3dn.24xlarge)": (
        "8 V100 on NVLink (100 GB/s), 100 Gbit/s EFA at line rate, 20 µs per "
        "message, 6 GB/s device-to-host per GPU (two GPUs per PCIe 3 x16), "
        "host sum at 50 GB/s, 25 MiB buckets, full overlap"),
    "AmoebaNet-D (18, 256)": (
        "24 cells of equal cost (the planner's linear-in-micro-batch "
        "compute; no per-micro-batch overhead), free transfers between "
        "stages, GPipe's fill-drain schedule, one global batch for all cells"),
}


@dataclasses.dataclass(frozen=True)
class PublishedRow:
    """One published figure and the planner's prediction of it.

    Args:
        source: Where the figure is published.
        setting: Model, hardware and layout.
        metric: What the figure measures.
        published: The published value.
        predicted: The planner's value.

    Example:

    >>> row = reproduce()[0]
    >>> round(row.error, 2)
    """

    source: str
    setting: str
    metric: str
    published: float
    predicted: float

    @property
    def error(self) -> float:
        """`|predicted - published| / published`."""
        return abs(self.predicted - self.published) / self.published


def _uniform_profile(
    name: str, layers: int, step_time: float, batch: int, gradient_bytes: float
) -> Profile:
    per_layer = int(gradient_bytes / layers)
    return Profile(
        [
            LayerProfile(
                name=f"{name}_{i}", class_name="Block", inputs=(),
                time=step_time / layers, param_bytes=per_layer,
                trainable_bytes=per_layer, optimizer_bytes=0, output_bytes=0,
                live_bytes=0,
            )
            for i in range(layers)
        ],
        batch_size=batch,
        input_bytes=0,
        model_name=name,
    )


def _efficiency(
    profile: Profile, cluster: Cluster, batch: int, aggregation: str
) -> float:
    result = plan(profile, cluster, global_batch=batch * cluster.num_devices,
                  data_parallel=cluster.num_devices, pipeline_stages=1,
                  microbatches=1, aggregation=aggregation)
    return result.best.efficiency


def _horovod() -> list[PublishedRow]:
    cluster = Cluster(
        nodes=128, devices_per_node=4, device_memory=16e9,
        intra_node_bandwidth=10e9, inter_node_bandwidth=25 * GBIT,
        latency=10e-6, overlap=1.0, bucket_bytes=64 * 2**20,
    )
    rows = []
    for model, images_per_s, params, published in (
        ("Inception V3", 142, 23.9e6, 0.90),
        ("ResNet-101", 130, 44.5e6, 0.90),
        ("VGG-16", 154, 138.4e6, 0.68),
    ):
        profile = _uniform_profile(model, 10, 64 / images_per_s, 64, 4 * params)
        rows.append(PublishedRow(
            source="Horovod (README, docs/benchmarks.rst)",
            setting=f"{model}, 128 x 4 Pascal GPUs, 25 Gbit/s, batch 64/GPU, ring",
            metric="scaling efficiency at 512 GPUs",
            published=published,
            predicted=_efficiency(profile, cluster, 64, "ring"),
        ))
    return rows


def _herring() -> list[PublishedRow]:
    cluster = Cluster(
        nodes=256, devices_per_node=8, device_memory=32e9,
        intra_node_bandwidth=100e9, inter_node_bandwidth=100 * GBIT,
        latency=20e-6, host_reduce_bandwidth=50e9, device_host_bandwidth=6e9,
        overlap=1.0,
    )
    profile = _uniform_profile("BERT-large", 24, 0.32, 64, 2 * 340e6)
    return [PublishedRow(
        source="Herring (SC20), abstract",
        setting="BERT-large, 256 x 8 V100 (p3dn, EFA), host-sharded aggregation",
        metric="scaling efficiency at 2048 GPUs",
        published=0.85,
        predicted=_efficiency(profile, cluster, 64, "host_sharded"),
    )]


# GPipe Table 2 (Huang et al.) and torchgpipe's P40 reproduction, AmoebaNet-D
# (18, 256): throughput normalised to K=2, M=1.
_GPIPE = {
    (2, 4): (1.07, 1.539), (2, 32): (1.21, 1.773),
    (4, 1): (1.13, 1.004), (4, 4): (1.26, 1.666), (4, 32): (1.84, 2.709),
    (8, 1): (1.38, 0.932), (8, 4): (1.72, 2.621), (8, 32): (3.48, 4.953),
}


def _gpipe() -> list[PublishedRow]:
    profile = _uniform_profile("AmoebaNet-D", 24, 1.0, 128, 1e6)

    def throughput(k: int, m: int) -> float:
        cluster = Cluster(nodes=1, devices_per_node=k, device_memory=16e9,
                          intra_node_bandwidth=100e9, inter_node_bandwidth=100e9,
                          latency=0.0)
        return plan(profile, cluster, global_batch=128, data_parallel=1,
                    pipeline_stages=k, microbatches=m,
                    schedule="gpipe").best.samples_per_s

    base = throughput(2, 1)
    rows = []
    for (k, m), (huang, torchgpipe) in _GPIPE.items():
        predicted = throughput(k, m) / base
        for source, published in (("GPipe (NeurIPS 2019), Table 2", huang),
                                  ("torchgpipe docs (P40 reproduction)",
                                   torchgpipe)):
            rows.append(PublishedRow(
                source=source,
                setting=f"AmoebaNet-D (18, 256), K={k} partitions, M={m}",
                metric="throughput / (K=2, M=1)",
                published=published,
                predicted=predicted,
            ))
    return rows


def reproduce() -> list[PublishedRow]:
    """Predicts every published figure this module knows.

    Returns:
        The `PublishedRow`s: Horovod, Herring, GPipe.

    Example:

    >>> for row in reproduce():
    ...     print(row.setting, row.published, round(row.predicted, 2))
    """
    return _horovod() + _herring() + _gpipe()


def markdown(rows: list[PublishedRow] | None = None) -> str:
    """The README table of `reproduce()`.

    Args:
        rows: Rows to show. Defaults to `None` (`reproduce()`).

    Returns:
        A Markdown table: source, setting, metric, published, predicted,
        error.

    Example:

    >>> print(markdown())
    """
    rows = reproduce() if rows is None else rows
    lines = [
        "| source | setting | metric | published | predicted | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} | {r.setting} | {r.metric} | {r.published:.2f} | "
            f"{r.predicted:.2f} | {100 * r.error:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    """Prints the table and the assumed inputs (`python -m ...published`).

    Example:

    >>> main()
    0
    """
    del argv
    print(markdown())  # noqa: T201 - a script's output
    print()  # noqa: T201
    for key, value in ASSUMPTIONS.items():
        print(f"- {key}: {value}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
