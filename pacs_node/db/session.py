"""Engine and session factory, with the pragmas SQLite needs for a
multi-threaded server (WAL, busy timeout, foreign keys)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database"]

logger = logging.getLogger(__name__)


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
            if u.database and u.database != ":memory:":
                Path(u.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
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
