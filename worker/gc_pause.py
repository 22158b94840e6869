"""Pause Python's cyclic garbage collector while a job runs.

Reading a 400-slice series with pydicom and building its SEG, map and SR with
highdicom allocate hundreds of thousands of small container objects (data
elements, sequences, content items). Every 700 allocations the collector
runs, and its older generations walk every live object, the source headers
included: 0.3-0.7 s of a 2 s output build on two cores
(``docs/benchmarks.md``, End to end). The job's memory is dominated by numpy
arrays, which reference counting frees anyway; the few reference cycles the
job leaves are collected once the pause ends.

The pause is process-wide (``gc.disable``), counted so that overlapping jobs
in threads of one process re-enable the collector only when the last ends.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_depth = 0
_was_enabled = True


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block; restore its previous state after.

    Nested and concurrent uses are counted: the collector comes back on when
    the outermost block exits, and only if it was on when the first began.
    """
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
