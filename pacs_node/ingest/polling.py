"""Adaptive network polling for accepted associations.

pynetdicom's DUL thread polls its socket and its send queue, sleeping 1 ms
whenever a loop finds nothing to do. Every C-STORE therefore waits up to a
millisecond for its request to be picked up and again for its response to be
sent: on a fast host that is most of a small instance's round trip
(``benchmarks/pynetdicom_floor.py``: an SCP that stores nothing answers 341
instances/s with the 1 ms sleep and 625/s with this module, at the same CPU
per instance). A shorter sleep costs CPU while a connection is idle (a fixed
0.1 ms: +9 % of a core per open association, ``pynetdicom_floor.py --idle``),
so the loop sleeps the short interval
only while data is arriving (less than :data:`ACTIVE_WINDOW` seconds since
the DUL last received something) and pynetdicom's 1 ms otherwise. With
several associations moving data at once the node is CPU-bound and every
extra wake-up competes for the GIL with the handlers (4 associations: 229 ->
195 instances/s when all four polled fast), so the short interval applies
only while a single association is active.

This relies on two pynetdicom 3.0 internals: ``DULServiceProvider.
_run_loop_delay`` (read on every loop) and the idle timer that the DUL
restarts on every received PDU. When they are missing (another version)
the association keeps pynetdicom's own polling;
``tests/test_dimse_ingest.py`` checks both behaviours.
"""

from __future__ import annotations

import logging
import time
import weakref

from pynetdicom.dul import DULServiceProvider

__all__ = ["ACTIVE_WINDOW", "IDLE_DELAY", "AdaptivePollDUL", "active_associations", "enable_adaptive_polling"]

logger = logging.getLogger(__name__)

#: pynetdicom's own sleep between idle loops (s).
IDLE_DELAY = 0.001
#: How long after the last received data the short interval applies (s).
#: It covers the C-STORE handler's own time (write, fsync, commit), after
#: which the response must go out promptly.
ACTIVE_WINDOW = 0.5


#: How often the number of active associations is recounted (s).
_RECOUNT = 0.01
_duls: weakref.WeakSet[AdaptivePollDUL] = weakref.WeakSet()
_count = {"at": 0.0, "active": 0}


def _is_active(dul: DULServiceProvider, now: float) -> bool:
    started = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
    return started is not None and now - started < ACTIVE_WINDOW and dul.is_alive()


def active_associations(now: float | None = None) -> int:
    """Associations with adaptive polling that received data in the last :data:`ACTIVE_WINDOW`.

    Recounted at most every 10 ms (every DUL loop asks).
    """
    now = time.time() if now is None else now
    if now - _count["at"] >= _RECOUNT:
        _count["active"] = sum(1 for d in list(_duls) if _is_active(d, now))
        _count["at"] = now
    return int(_count["active"])


class AdaptivePollDUL(DULServiceProvider):
    """A DUL whose idle sleep is short while data flows (see the module docstring)."""

    @property
    def _run_loop_delay(self) -> float:
        active: float | None = self.__dict__.get("_active_delay")
        now = time.time()
        if active is None or not _is_active(self, now) or active_associations(now) > 1:
            return IDLE_DELAY
        return active

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        # pynetdicom's constructor assigns its default; the property decides.
        pass


def enable_adaptive_polling(dul: DULServiceProvider, active_delay: float) -> bool:
    """Make ``dul`` sleep ``active_delay`` seconds between loops while data flows.

    Call before the DUL thread starts (``EVT_CONN_OPEN``).

    Parameters
    ----------
    dul:
        The association's DUL service provider, exactly pynetdicom's class.
    active_delay:
        Sleep while active, in seconds (below :data:`IDLE_DELAY`).

    Returns
    -------
    bool
        ``False`` when the DUL is not the expected class or lacks the idle
        timer (another pynetdicom version): its polling is left unchanged.
    """
    if type(dul) is not DULServiceProvider or not hasattr(dul, "_idle_timer"):
        logger.debug("adaptive polling not applied to %s", type(dul).__name__)
        return False
    dul.__dict__["_active_delay"] = float(active_delay)
    dul.__class__ = AdaptivePollDUL
    _duls.add(dul)  # type: ignore[arg-type]
    return True
