"""Horovod's Keras elastic training (`hvd.elastic`): not supported by tf_smdist.

Using any name of this module raises `NotImplementedError` saying so.
"""

from __future__ import annotations

from typing import Any

from tf_smdist.horovod.elastic import ElasticNotSupportedError, not_supported

__all__ = ["ElasticNotSupportedError"]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    not_supported(name)
