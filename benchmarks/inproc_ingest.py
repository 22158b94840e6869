"""Diagnostic: the node's DIMSE ingest in-process (DimseServer + Ingestor,
SQLite, fsync on), fed by dcmtk storescu; prints images/s and the group
commit statistics (requests per commit).

    python benchmarks/inproc_ingest.py [--n 300] [--assocs 4] [--nofsync]
    python benchmarks/inproc_ingest.py --micro     # ms per step of the handler's work
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, free_port, make_ct_series, send_parallel


def micro(n: int) -> dict[str, float]:
    """Median ms per step of the node's handler work, no network, no fsync (files from the CT data set)."""
    import hashlib
    import statistics
    import struct
    import time

    from pacs_node.db.migrate import upgrade
    from pacs_node.db.session import Database
    from pacs_node.ingest.recorder import Ingestor, encode_part10, parse_meta
    from pacs_node.ingest.storage import InstanceStore

    datas = [p.read_bytes() for p in make_ct_series(500, OUT_DIR / "data" / "ct512-500")[:n]]
    work = OUT_DIR / "work-micro"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = Database(f"sqlite:///{work / 'n.db'}")
    upgrade(db)
    ing = Ingestor(db, InstanceStore(work / "st", fsync=False, min_free_bytes=256 << 20))
    t: dict[str, list[float]] = {k: [] for k in ("parse_meta", "encode_part10", "lookup", "sha256", "write_nofsync",
                                                 "record_and_commit")}
    try:
        for d in datas:
            meta_len = struct.unpack("<I", d[140:144])[0]
            a = time.perf_counter()
            m = parse_meta(d)
            t["parse_meta"].append(time.perf_counter() - a)
            a = time.perf_counter()
            encode_part10(d[144 + meta_len:], m, source_aet="BENCH")
            t["encode_part10"].append(time.perf_counter() - a)
            a = time.perf_counter()
            ing._lookup(m.sop_uid)
            t["lookup"].append(time.perf_counter() - a)
            a = time.perf_counter()
            hashlib.sha256(d).hexdigest()
            t["sha256"].append(time.perf_counter() - a)
            a = time.perf_counter()
            st = ing.store.write(m.study_uid, m.series_uid, m.sop_uid, d)
            t["write_nofsync"].append(time.perf_counter() - a)
            a = time.perf_counter()
            ing._record(m, st.relpath, st.size, st.sha256, "dimse", "BENCH")
            t["record_and_commit"].append(time.perf_counter() - a)
    finally:
        db.dispose()
        shutil.rmtree(work, ignore_errors=True)
    return {f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in t.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--assocs", type=int, default=4)
    ap.add_argument("--nofsync", action="store_true")
    ap.add_argument("--micro", action="store_true",
                    help="time each step of the handler's work in a loop instead (no network, no fsync)")
    args = ap.parse_args()
    if args.micro:
        print(json.dumps(micro(min(args.n, 200))))
        return 0
    from pacs_node.config import DicomSettings
    from pacs_node.db.migrate import upgrade
    from pacs_node.db.session import Database
    from pacs_node.ingest.dimse import DimseServer
    from pacs_node.ingest.recorder import Ingestor
    from pacs_node.ingest.storage import InstanceStore

    files = make_ct_series(500, OUT_DIR / "data" / "ct512-500")[: args.n]
    work = OUT_DIR / "work-inproc"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = Database(f"sqlite:///{work / 'node.db'}")
    upgrade(db)
    ingestor = Ingestor(db, InstanceStore(work / "storage", fsync=not args.nofsync, min_free_bytes=256 << 20))
    server = DimseServer(DicomSettings(port=free_port()), ingestor)
    server.start()
    import os
    import time

    t0, w0 = os.times(), time.perf_counter()
    try:
        r = send_parallel(files, server.port, aec="PACSNODE", associations=args.assocs)
        assert r.returncode == 0, r.stderr
        t1, w1 = os.times(), time.perf_counter()
    finally:
        server.stop()
        db.dispose()
        shutil.rmtree(work, ignore_errors=True)
    gc = getattr(ingestor, "_commits", None)
    print(json.dumps({"images_per_s": round(r.n / r.seconds, 1), "assocs": args.assocs,
                      "commits": getattr(gc, "batches", None), "requests": getattr(gc, "requests", None),
                      "cpu_ms_per_instance": round(1000 * ((t1.user - t0.user) + (t1.system - t0.system)) / r.n, 2),
                      "cpu_user_ms": round(1000 * (t1.user - t0.user) / r.n, 2),
                      "cpu_sys_ms": round(1000 * (t1.system - t0.system) / r.n, 2),
                      "cpu_utilisation": round(((t1.user - t0.user) + (t1.system - t0.system)) / (w1 - w0), 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
