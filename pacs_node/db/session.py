"""Engine and session factory, with the pragmas SQLite needs for a
multi-threaded server (WAL, busy timeout, foreign keys). A SQLite database
file (it holds patient names and IDs) is created readable by its owner only."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "GroupCommit", "private_sqlite_file"]

logger = logging.getLogger(__name__)


def private_sqlite_file(path: Path) -> None:
    """Make sure the SQLite database file is readable by its owner only (0600).

    A new file is created empty with mode 0600 before SQLite opens it (an
    empty file is a valid empty database); SQLite gives its ``-wal``, ``-shm``
    and ``-journal`` files the mode of the database file. An existing file
    (and its companions) with group or other permissions is tightened to 0600.

    Parameters
    ----------
    path:
        The database file.

    Raises
    ------
    OSError
        When the directory or the file cannot be created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                p.chmod(0o600)
            except OSError as exc:
                logger.warning("database file %s is readable by others (mode %o) and cannot be made private: %s",
                               p, mode & 0o777, exc.strerror)
            else:
                logger.warning("database file %s was readable by others (mode %o): now 0600", p, mode & 0o777)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit
    # transactions would defer locking and break read-then-write atomicity).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("pacs_node_read_only"):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the engine and hands out sessions.

    Parameters
    ----------
    url:
        SQLAlchemy URL (``sqlite:///...`` or ``postgresql+psycopg://...``;
        ``postgresql://`` is mapped to the psycopg 3 driver).
    echo:
        Log every SQL statement.
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        u = make_url(url)
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        self.url = u
        self.is_sqlite = u.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
                private_sqlite_file(Path(u.database).expanduser().resolve())
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        self.engine: Engine = create_engine(u, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # Take the write lock at BEGIN so that read-then-write transactions
            # serialize instead of failing with "database is locked" on upgrade.
            # Read-only connections (``read_connection``) begin DEFERRED: a
            # WAL reader never waits for the writer.
            event.listen(self.engine, "begin", _sqlite_begin)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessionmaker() as s:
            with s.begin():
                yield s

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A Core connection for short reads; on SQLite its transaction is
        ``BEGIN`` (deferred), so it neither takes nor waits for the write lock.
        Never write through it."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(pacs_node_read_only=True)
            yield conn

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


T = TypeVar("T")


class _Request(Generic[T]):
    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Callable[[Connection], T]) -> None:
        self.fn = fn
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Group commit for short write transactions issued by concurrent threads.

    ``run(fn)`` executes ``fn(conn)`` inside a transaction and returns its
    value only once that transaction is **committed**. Threads that call
    ``run`` while a commit is in progress are queued; the next of them to get
    the turn (the leader) runs every queued request in one transaction, each
    in its own SAVEPOINT, so one ``COMMIT`` (one fsync of the SQLite WAL, one
    WAL flush on PostgreSQL) serves them all. A request that raises is rolled
    back to its savepoint and its caller gets the exception; the others still
    commit. If the commit itself fails, every request of the batch gets that
    error. A single queued request runs without savepoints.

    The turn-taking also replaces SQLite's busy-wait (sleeps of up to 100 ms
    while another thread holds the write lock) by an immediate hand-over
    between this process's writers.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Request[Any]] = []
        self._leading = False
        self.batches = 0
        self.requests = 0

    def run(self, fn: Callable[[Connection], T]) -> T:
        req: _Request[T] = _Request(fn)
        with self._cond:
            self._queue.append(req)
            while self._leading and not req.done:
                self._cond.wait()
            if not req.done:
                self._leading = True
                batch, self._queue = self._queue, []
        if not req.done:
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if req.error is not None:
            raise req.error
        return req.value  # type: ignore[return-value]

    def _execute(self, batch: list[_Request[Any]]) -> None:
        self.batches += 1
        self.requests += len(batch)
        try:
            with self.engine.begin() as conn:
                if len(batch) == 1:
                    batch[0].value = batch[0].fn(conn)
                else:
                    for req in batch:
                        sp = conn.begin_nested()
                        try:
                            req.value = req.fn(conn)
                        except Exception as exc:  # noqa: BLE001 - handed to the request's caller
                            sp.rollback()
                            req.error = exc
                        else:
                            sp.commit()
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets it
            for req in batch:
                if req.error is None:
                    req.error = exc
                    req.value = None
        finally:
            for req in batch:
                req.done = True
