"""Horovod's `horovod.tensorflow.functions` module, for scripts that import it.

Some scripts import the object and variable broadcasts from this module
(`from horovod.tensorflow.functions import broadcast_object`); after the
one-line change they come from here. They are the same functions as
`tf_smdist.horovod.broadcast_variables`, `broadcast_object`,
`broadcast_object_fn` and `allgather_object`.

Example:
>>> from tf_smdist.horovod.functions import broadcast_object
>>> broadcast_object({"epoch": 2}, root_rank=0)
{'epoch': 2}
"""

from __future__ import annotations

from tf_smdist.horovod.collectives import broadcast_variables
from tf_smdist.horovod.objects import (
           allgather_object,
           broadcast_object,
           broadcast_object_fn,
)

__all__ = ["allgather_object", "broadcast_object", "broadcast_object_fn",
           "broadcast_variables"]
