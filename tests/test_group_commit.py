"""GroupCommit: concurrent writers share commits; a failing request is rolled
back alone; nobody returns before its transaction is committed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from pacs_node.db.session import Database, GroupCommit


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(f"sqlite:///{tmp_path / 'gc.db'}")
    with d.engine.begin() as c:
        c.execute(text("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    yield d
    d.dispose()


def test_concurrent_requests_commit_and_fail_independently(db: Database) -> None:
    gc = GroupCommit(db.engine)
    gate = threading.Barrier(8)
    results: dict[int, object] = {}

    def insert(k: int) -> None:
        gate.wait()

        def fn(conn):  # type: ignore[no-untyped-def]
            conn.execute(text("INSERT INTO t (k, v) VALUES (:k, 'x')"), {"k": k})
            if k % 4 == 3:
                raise ValueError(f"refused {k}")
            return k

        try:
            results[k] = gc.run(fn)
            # Committed before run() returned: visible on another connection.
            with db.engine.connect() as c:
                assert c.execute(text("SELECT count(*) FROM t WHERE k = :k"), {"k": k}).scalar_one() == 1
        except ValueError as exc:
            results[k] = exc

    threads = [threading.Thread(target=insert, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.engine.connect() as c:
        stored = {r[0] for r in c.execute(text("SELECT k FROM t"))}
    assert stored == {0, 1, 2, 4, 5, 6}
    assert all(isinstance(results[k], ValueError) for k in (3, 7))
    assert gc.requests == 8 and 1 <= gc.batches <= 8


def test_commit_failure_reaches_every_request_of_the_batch(db: Database) -> None:
    gc = GroupCommit(db.engine)
    with pytest.raises(Exception):  # noqa: B017 - the driver's error class
        gc.run(lambda conn: conn.execute(text("INSERT INTO missing_table VALUES (1)")))
    assert gc.run(lambda conn: conn.execute(text("INSERT INTO t (k, v) VALUES (1, 'y')")).rowcount) == 1
