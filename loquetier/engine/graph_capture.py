"""Python's cyclic garbage collector held off while a CUDA graph is captured.

PyTorch captures in the "global" mode, where a thread that makes a CUDA call unsafe during capture
(freeing pinned host memory, destroying another graph or an event) invalidates the capture in
progress. The collector can run at any allocation and finalize dead cycles that own such
resources (an earlier engine's graphs, a step's pinned buffers), so a capture could fail now and
then for no reason in its own code; `torch.cuda.graph` no longer collects before it captures.
Holding the collector off for the capture's few hundred milliseconds removes that; what it would
have freed is collected afterwards."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def collector_paused():
    """Disable the cyclic collector inside the block; restore its previous state on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
