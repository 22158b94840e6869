"""Arrivals: which association, STOW-RS request or pull brought a study, and
how it ended.

A study cut mid-send (the sender aborted, the connection was lost, the node
was killed) must not be analysed as if it were complete. Since a SIGKILL gives
no event, the record is durable: the first instance an arrival stores of a
study writes an ``arrivals`` row **in the same commit** as the instance row
(:meth:`ArrivalTracker.record`, called from the recorder's group commit), and
the row is closed when the arrival ends:

* ``released``: A-RELEASE, a STOW-RS request whose whole body was read, a
  pull that finished;
* ``aborted``: A-ABORT received or sent (including the node's own abort of an
  association idle for ``dicom.network_timeout``), a STOW-RS body cut by the
  client, truncated or refused as too large, a pull that failed;
* ``lost``: the connection closed with neither release nor abort;
* ``crashed``: still open when the node started again
  (:meth:`ArrivalTracker.recover`).

An abnormal end marks the study interrupted (``studies.interrupted_at`` = the
cut arrival's last instance, ``interrupted_reason`` = the outcome) when its
pending version is not yet claimed by a job; the assembler then holds it (see
:mod:`pacs_node.assemble.scheduler`). A later arrival -- one whose first
instance came after ``interrupted_at`` -- that ends ``released`` clears the
mark, and the usual stable period applies again. Creating the version's job
(assembler or operator) clears it too.

Each node process owns its open arrivals (``host``, ``pid`` and a random
``process`` token); at start-up only arrivals whose process is gone are
closed as ``crashed``, so a ``pacs-node analyze --source`` pull running beside
a restarting node keeps its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from pynetdicom import evt
from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from pacs_node.db.models import ARRIVAL_ABNORMAL, Arrival, Study, utcnow
from pacs_node.db.session import Database, GroupCommit

__all__ = ["ARRIVAL_OUTCOMES", "ArrivalTracker", "Settled", "dimse_arrival_handlers"]

logger = logging.getLogger(__name__)

#: Every value of ``arrivals.outcome`` (NULL while open).
ARRIVAL_OUTCOMES = ("released", *ARRIVAL_ABNORMAL)

_A = cast(Table, Arrival.__table__)
_S = cast(Table, Study.__table__)

#: Tokens of the trackers alive in this process (several nodes in one
#: process share a pid: tests, embedded use).
_LIVE_PROCESSES: set[str] = set()
_LIVE_LOCK = threading.Lock()

#: How long a connection-close watcher waits for the association thread (s).
_ASSOC_JOIN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Settled:
    """What closing one arrival did to its study: ``interrupted``,
    ``cleared`` (a complete arrival after an interruption), ``claimed``
    (abnormal end of a version already analysed: nothing to hold) or
    ``unchanged``."""

    study_id: int
    outcome: str
    effect: str
    instances: int


def _arrival_upsert(insert_fn: Any) -> Any:
    now = bindparam("now", type_=_A.c.opened_at.type)
    stmt = insert_fn(_A).values(
        study_id=bindparam("study_id"),
        key=bindparam("key"),
        source=bindparam("source"),
        calling_aet=bindparam("calling_aet"),
        host=bindparam("host"),
        pid=bindparam("pid"),
        process=bindparam("process"),
        opened_at=now,
        last_instance_at=now,
        instance_count=1,
    )
    return stmt.on_conflict_do_update(
        index_elements=["key", "study_id"],
        set_={"instance_count": _A.c.instance_count + 1, "last_instance_at": stmt.excluded.last_instance_at},
    )


_UPSERT = {"sqlite": _arrival_upsert(sqlite_insert), "postgresql": _arrival_upsert(pg_insert)}
_OPEN_OF_KEY = (
    select(_A.c.id, _A.c.study_id, _A.c.opened_at, _A.c.last_instance_at, _A.c.instance_count)
    .where(_A.c.key == bindparam("key"), _A.c.outcome.is_(None))
    .with_for_update()
)
_CLOSE = (
    update(_A)
    .where(_A.c.id == bindparam("aid"), _A.c.outcome.is_(None))
    .values(outcome=bindparam("outcome"), closed_at=bindparam("now", type_=_A.c.closed_at.type))
)
_STUDY_FOR_UPDATE = (
    select(_S.c.id, _S.c.version, _S.c.job_version, _S.c.interrupted_at)
    .where(_S.c.id == bindparam("sid"))
    .with_for_update()
)
_MARK = (
    update(_S)
    .where(_S.c.id == bindparam("sid"))
    .values(interrupted_at=bindparam("at", type_=_S.c.interrupted_at.type), interrupted_reason=bindparam("reason"))
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ArrivalTracker:
    """Records arrivals and settles their studies when they end.

    Parameters
    ----------
    db:
        The node's database.
    commits:
        The recorder's group commit: closing an arrival takes its turn with
        the instance commits (on SQLite, no busy-wait on the write lock).
    """

    def __init__(self, db: Database, commits: GroupCommit) -> None:
        self.db = db
        self.commits = commits
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.process = uuid.uuid4().hex[:16]
        self._upsert = _UPSERT["sqlite" if db.is_sqlite else "postgresql"]
        self._lock = threading.Lock()
        #: Keys with at least one committed arrival row (closing others is a no-op).
        self._stored: set[str] = set()
        self._assocs: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        with _LIVE_LOCK:
            _LIVE_PROCESSES.add(self.process)
        weakref.finalize(self, _forget_process, self.process)

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def new_key(source: str) -> str:
        """A fresh arrival key (``dimse-…``, ``stowrs-…``, ``pull-…``)."""
        return f"{source}-{uuid.uuid4().hex}"

    def key_for(self, assoc: Any) -> str:
        """The arrival key of a pynetdicom association (made on first use)."""
        with self._lock:
            key = self._assocs.get(assoc)
            if key is None:
                key = self._assocs[assoc] = self.new_key("dimse")
            return key

    # -- recording (inside the instance's transaction) --------------------------------
    def record(self, conn: Connection, *, key: str, study_id: int, source: str,
               calling_aet: str | None, now: dt.datetime) -> None:
        """Open (or count one more instance on) the arrival of ``key`` for the
        study, in the caller's transaction (the instance row's commit)."""
        aet = calling_aet if calling_aet is None or len(calling_aet) <= 16 else calling_aet[:16]
        conn.execute(self._upsert, dict(
            study_id=study_id, key=key, source=source, calling_aet=aet,
            host=self.host, pid=self.pid, process=self.process, now=now,
        ))

    def stored(self, key: str) -> None:
        """Note that ``key`` has committed rows (called after the commit)."""
        with self._lock:
            self._stored.add(key)

    # -- closing -----------------------------------------------------------------------
    def close(self, key: str, outcome: str) -> list[Settled]:
        """Close the open arrivals of ``key`` with ``outcome`` and settle their studies.

        A key that stored nothing costs nothing. A database failure is
        logged; the rows stay open and the next start-up closes them as
        ``crashed`` (the conservative reading).

        Raises
        ------
        ValueError
            For an unknown outcome.
        """
        if outcome not in ARRIVAL_OUTCOMES:
            raise ValueError(f"unknown arrival outcome {outcome!r}")
        with self._lock:
            if key not in self._stored:
                return []
            self._stored.discard(key)
        try:
            settled = self.commits.run(lambda conn: self._close_rows(conn, key, outcome, utcnow()))
        except SQLAlchemyError as exc:
            logger.error("arrival %s: cannot record its end (%s): %s; it will count as crashed at the next start",
                         key[:20], outcome, exc.__class__.__name__)
            return []
        _log_settled(key, settled)
        return settled

    async def aclose(self, key: str, outcome: str) -> list[Settled]:
        """:meth:`close` from async code (in a worker thread when there is anything to close)."""
        with self._lock:
            if key not in self._stored:
                return []
        return await run_in_threadpool(self.close, key, outcome)

    def _close_rows(self, conn: Connection, key: str, outcome: str, now: dt.datetime) -> list[Settled]:
        out = []
        for row in conn.execute(_OPEN_OF_KEY, {"key": key}).all():
            conn.execute(_CLOSE, {"aid": row.id, "outcome": outcome, "now": now})
            effect = self._settle(conn, row.study_id, outcome, row.opened_at, row.last_instance_at)
            out.append(Settled(int(row.study_id), outcome, effect, int(row.instance_count)))
        return out

    @staticmethod
    def _settle(conn: Connection, study_id: int, outcome: str, opened_at: dt.datetime,
                last_instance_at: dt.datetime) -> str:
        study = conn.execute(_STUDY_FOR_UPDATE, {"sid": study_id}).first()
        if study is None:
            return "unchanged"
        pending = int(study.job_version) < int(study.version)
        if outcome in ARRIVAL_ABNORMAL:
            if not pending:
                return "claimed"
            at = last_instance_at if study.interrupted_at is None else max(study.interrupted_at, last_instance_at)
            conn.execute(_MARK, {"sid": study_id, "at": at, "reason": outcome})
            return "interrupted"
        if study.interrupted_at is not None and opened_at > study.interrupted_at:
            conn.execute(_MARK, {"sid": study_id, "at": None, "reason": None})
            return "cleared"
        return "unchanged"

    # -- start-up ------------------------------------------------------------------------
    def recover(self) -> list[Settled]:
        """Close as ``crashed`` the open arrivals of node processes that are gone.

        An arrival is kept open when its process is another live process on
        this host (a CLI pull), or a live tracker of this process.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            When the database cannot be read or written.
        """
        with _LIVE_LOCK:
            live = set(_LIVE_PROCESSES)
        with self.db.read_connection() as conn:
            rows = conn.execute(
                select(_A.c.key, _A.c.host, _A.c.pid, _A.c.process).where(_A.c.outcome.is_(None))
            ).all()
        orphans: set[str] = set()
        for key, host, pid, process in rows:
            if process in live:
                continue
            if host == self.host and pid != self.pid and _pid_alive(int(pid)):
                continue
            orphans.add(key)
        settled: list[Settled] = []
        now = utcnow()
        for key in sorted(orphans):
            result = self.commits.run(partial(self._close_rows, key=key, outcome="crashed", now=now))
            _log_settled(key, result)
            settled.extend(result)
        if orphans:
            held = sum(1 for s in settled if s.effect == "interrupted")
            logger.warning(
                "start-up: %d arrival(s) were cut by the node's previous end (crash or kill); "
                "%d study(ies) marked interrupted: they wait for a complete resend, source "
                "verification or an operator", len(orphans), held,
            )
        return settled

    # -- DIMSE association events --------------------------------------------------------
    def end_association(self, assoc: Any, outcome: str) -> None:
        """Close the arrival of an association (once, whichever event comes first)."""
        with self._lock:
            key = self._assocs.pop(assoc, None)
        if key is not None:
            self.close(key, outcome)

    def connection_closed(self, assoc: Any) -> None:
        """``EVT_CONN_CLOSE``: the last event of an association.

        Usually ``EVT_RELEASED`` / ``EVT_ABORTED`` settled it already. If not
        (a connection dropped while a C-STORE was being stored, or the
        release still being answered), the verdict waits for the association
        thread to end in a short-lived watcher thread, so an instance still
        being committed is counted before its arrival is closed.
        """
        with self._lock:
            if assoc not in self._assocs:
                return

        def watch() -> None:
            try:
                if assoc is not threading.current_thread():
                    assoc.join(timeout=_ASSOC_JOIN_TIMEOUT)
            finally:
                outcome = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "lost"
                self.end_association(assoc, outcome)

        threading.Thread(target=watch, name="arrival-close", daemon=True).start()


def _forget_process(token: str) -> None:
    with _LIVE_LOCK:
        _LIVE_PROCESSES.discard(token)


def _log_settled(key: str, settled: list[Settled]) -> None:
    """One line per study whose arrival ended; no patient data (internal study id)."""
    for s in settled:
        if s.effect == "interrupted":
            logger.warning(
                "study %d: arrival %s ended %s after %d instance(s); the study is interrupted and waits for "
                "a complete resend, source verification or an operator", s.study_id, key[:20], s.outcome,
                s.instances,
            )
        elif s.effect == "claimed":
            logger.info("study %d: arrival %s ended %s after %d instance(s); its version already has a job",
                        s.study_id, key[:20], s.outcome, s.instances)
        elif s.effect == "cleared":
            logger.info("study %d: arrival %s ended normally after %d instance(s); the interruption is cleared",
                        s.study_id, key[:20], s.instances)
        else:
            logger.debug("study %d: arrival %s ended %s (%d instance(s))", s.study_id, key[:20], s.outcome,
                         s.instances)


def _on_released(event: evt.Event, tracker: ArrivalTracker) -> None:
    tracker.end_association(event.assoc, "released")


def _on_aborted(event: evt.Event, tracker: ArrivalTracker) -> None:
    tracker.end_association(event.assoc, "aborted")


def _on_conn_close(event: evt.Event, tracker: ArrivalTracker) -> None:
    tracker.connection_closed(event.assoc)


def dimse_arrival_handlers(tracker: ArrivalTracker) -> list[Any]:
    """pynetdicom event handlers that close each association's arrival."""
    return [
        (evt.EVT_RELEASED, _on_released, [tracker]),
        (evt.EVT_ABORTED, _on_aborted, [tracker]),
        (evt.EVT_CONN_CLOSE, _on_conn_close, [tracker]),
    ]
