"""Horovod's elastic training (`hvd.elastic`): not supported by tf_smdist.

Importing this module works, so scripts that mention `hvd.elastic` load;
using any of its names raises `NotImplementedError` saying so.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["ElasticNotSupportedError", "not_supported"]


class ElasticNotSupportedError(NotImplementedError):
    """Raised when a script uses Horovod's elastic training."""


def not_supported(name: str) -> NoReturn:
    """Raises the error for `hvd.elastic.<name>`.

    Example:
    >>> not_supported("run")
    Traceback (most recent call last):
    ...
    tf_smdist.horovod.elastic.ElasticNotSupportedError: Elastic training ...
    """
    raise ElasticNotSupportedError(
        "Elastic training is not supported by tf_smdist.horovod: a job keeps "
        f"its processes from start to end. Received: hvd.elastic.{name}. Run a "
        "fixed number of processes (`python -m tf_smdist.launch --nproc N "
        "train.py`), checkpoint with keras.callbacks.BackupAndRestore, and "
        "restart the job to change its size.")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    not_supported(name)
