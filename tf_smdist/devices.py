"""Logical CPU devices for tests, demos and CPU-only training."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["configure_cpu_devices"]


def configure_cpu_devices(n: int) -> list[str]:
    """Splits the host CPU into `n` logical devices.

    TensorFlow fixes its devices when it first initialises them (the first op,
    `tf.config.list_logical_devices`, a strategy), so call this at the start of
    the program. Calling it again with the same `n` is a no-op.

    Args:
        n: the number of logical CPU devices, at least 1.

    Returns:
        The names of the logical CPU devices, e.g. `["/device:CPU:0", ...]`.

    Raises:
        ValueError: `n` is not a positive integer.
        RuntimeError: TensorFlow has already initialised its devices with a
            different number of CPU devices.

    Example:
    >>> import tf_smdist as smd
    >>> smd.configure_cpu_devices(2)
    ['/device:CPU:0', '/device:CPU:1']
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"`n` must be a positive integer. Received: n={n!r}"
        )
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as e:
        current = tf.config.list_logical_devices("CPU")
        if len(current) == n:
            return [d.name for d in current]
        raise RuntimeError(
            f"TensorFlow has already initialised {len(current)} logical CPU "
            f"device(s), so they cannot be split into {n}. Received: n={n}. "
            "Call `configure_cpu_devices` at the start of the program, before "
            "any TensorFlow op runs or a strategy is created."
        ) from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]
