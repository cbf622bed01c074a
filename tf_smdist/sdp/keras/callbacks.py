"""SageMaker data parallel's Keras callbacks (aliases of Horovod's)."""

from __future__ import annotations

from tf_smdist.horovod.keras.callbacks import (
    BroadcastGlobalVariablesCallback,
    MetricAverageCallback,
)

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback"]
