"""Capacity of the shared services on this machine, for the scale-out
arithmetic: PostgreSQL and SQLite commits/s (one small INSERT per
transaction, as the node's ingest does), Redis round trips/s (LPUSH + RPOP,
as a broker hand-over does).

    python benchmarks/capacity_probes.py [--seconds 5] [--publish]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    OUT_DIR,
    PG_URL,
    RESULTS_DIR,
    log,
    machine_info,
    pg_available,
    tcp_open,
    write_json,
)


def timed(threads: int, seconds: float, make_worker: Any) -> float:
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        step = make_worker()
        while time.monotonic() < stop:
            step()
            counts[i] += 1

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return round(sum(counts) / (time.perf_counter() - t0), 1)


def pg_commits(threads: int, seconds: float) -> float:
    import psycopg

    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    table = f"bench_probe_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE TABLE {table} (id bigserial primary key, v text)")
    try:
        def make() -> Any:
            conn = psycopg.connect(dsn)

            def step() -> None:
                conn.execute(f"INSERT INTO {table} (v) VALUES ('x')")
                conn.commit()
            return step
        return timed(threads, seconds, make)
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP TABLE {table}")


def sqlite_commits(seconds: float) -> float:
    d = OUT_DIR / f"probe-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    try:
        con = sqlite3.connect(d / "p.db", isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")

        def make() -> Any:
            def step() -> None:
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO t (v) VALUES ('x')")
                con.execute("COMMIT")
            return step
        r = timed(1, seconds, make)
        con.close()
        return r
    finally:
        shutil.rmtree(d, ignore_errors=True)


def redis_roundtrips(threads: int, seconds: float) -> float:
    import redis

    key = f"bench-probe-{uuid.uuid4().hex[:8]}"
    try:
        def make() -> Any:
            r = redis.Redis(host="127.0.0.1", port=6379, db=14)

            def step() -> None:
                r.lpush(key, b"x" * 512)
                r.rpop(key)
            return step
        return timed(threads, seconds, make)
    finally:
        redis.Redis(host="127.0.0.1", port=6379, db=14).delete(key)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"benchmark": "capacity", "command": "python benchmarks/capacity_probes.py " + " ".join(sys.argv[1:]),
                           "machine": machine_info(OUT_DIR)}
    out["sqlite_commits_per_s_1_thread"] = sqlite_commits(args.seconds)
    if pg_available():
        for t in (1, 4):
            out[f"postgresql_commits_per_s_{t}_threads"] = pg_commits(t, args.seconds)
    if tcp_open(6379):
        for t in (1, 4):
            out[f"redis_lpush_rpop_per_s_{t}_threads"] = redis_roundtrips(t, args.seconds)
    log(str({k: v for k, v in out.items() if k not in ("machine",)}))
    p = write_json("capacity.json", out)
    if args.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, RESULTS_DIR / p.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
