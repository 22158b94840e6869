"""Start-up storage reconciliation at scale (``pacs_node.ingest.reconcile``).

Builds a storage root of N small files in the node's layout
(``<study>/<series>/<sop>.dcm``) with their ``instances`` rows, plus a few
anomalies (leftover temporary files, row-less files, rows without a file),
then times :func:`reconcile_storage` -- one directory walk, the ``path``
column streamed in chunks -- on SQLite and, when available, PostgreSQL. The
runs are warm (the tree was just written, its inodes are cached; a cold walk
of a disk-backed archive costs more, bounded by the disk's metadata reads).
Every run but the last is a dry run; the last one acts and its counts are
checked. Writes ``benchmarks/out/reconcile.json``.

    python benchmarks/bench_reconcile.py [--files 100000] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, db_upgrade, log, machine_info, median, pg_available, pg_schema, write_json  # noqa: E402

from sqlalchemy import insert  # noqa: E402

from pacs_node.db.models import Instance, Series, Study  # noqa: E402
from pacs_node.db.session import Database  # noqa: E402
from pacs_node.ingest.reconcile import reconcile_storage  # noqa: E402
from pacs_node.ingest.storage import InstanceStore  # noqa: E402

PER_SERIES, SERIES_PER_STUDY = 100, 10
ANOMALIES = {"tmp": 20, "rowless": 20, "missing": 20}


def _uid() -> str:
    return "2.25." + str(uuid.uuid4().int)


def build(root: Path, db: Database, n_files: int) -> dict[str, int]:
    """Files and rows for ``n_files`` instances, then the anomalies."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    old = time.time() - 3600
    payload = b"\0" * 128 + b"DICM" + b"x" * 380
    studies: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    made = 0
    while made < n_files:
        st_uid = _uid()
        sid = len(studies) + 1
        studies.append(dict(id=sid, study_instance_uid=st_uid, first_received_at=now, last_received_at=now,
                            version_started_at=now, version=1, job_version=1, num_instances=0))
        for _ in range(SERIES_PER_STUDY):
            if made >= n_files:
                break
            se_uid = _uid()
            seid = len(series) + 1
            series.append(dict(id=seid, study_id=sid, series_instance_uid=se_uid, num_instances=0,
                               first_received_at=now, last_received_at=now))
            d = root / st_uid / se_uid
            d.mkdir(parents=True)
            for _ in range(min(PER_SERIES, n_files - made)):
                sop = _uid()
                rel = f"{st_uid}/{se_uid}/{sop}.dcm"
                (root / rel).write_bytes(payload)
                instances.append(dict(series_id=seid, study_id=sid, sop_instance_uid=sop, sop_class_uid="1.2.3",
                                      transfer_syntax_uid="1.2.840.10008.1.2.1", path=rel, size_bytes=len(payload),
                                      sha256="0" * 64, study_version=1, source="dimse", received_at=now,
                                      receive_count=1))
                made += 1
    with db.engine.begin() as c:
        c.execute(insert(Study), studies)
        c.execute(insert(Series), series)
        for i in range(0, len(instances), 5000):
            c.execute(insert(Instance), instances[i:i + 5000])
    dirs = sorted({str(Path(i["path"]).parent) for i in instances})
    for k in range(ANOMALIES["tmp"]):
        p = root / dirs[k % len(dirs)] / f".incoming-{k}.tmp"
        p.write_bytes(b"cut")
        os.utime(p, (old, old))
    for k in range(ANOMALIES["rowless"]):
        p = root / dirs[k % len(dirs)] / f"{_uid()}.dcm"
        p.write_bytes(payload)
        os.utime(p, (old, old))
    for k in range(ANOMALIES["missing"]):
        (root / instances[k * 7]["path"]).unlink()
    return {"files": made, "studies": len(studies), "series": len(series)}


def run(db_url: str, backend: str, workdir: Path, n_files: int, reps: int) -> dict[str, Any]:
    root = workdir / "storage"
    shutil.rmtree(root, ignore_errors=True)
    db_upgrade(db_url)
    db = Database(db_url)
    try:
        t0 = time.monotonic()
        shape = build(root, db, n_files)
        log(f"{backend}: built {shape['files']} files in {time.monotonic() - t0:.1f} s")
        store = InstanceStore(root, fsync=False)
        runs: list[dict[str, Any]] = []
        for rep in range(reps):
            # Dry runs leave the anomalies in place for every repetition;
            # the last run acts and is checked.
            report = reconcile_storage(db, store, grace_seconds=60, dry_run=rep < reps - 1)
            runs.append({"seconds": report.seconds, "dry_run": report.dry_run, "report": report.as_dict()})
            log(f"{backend} rep {rep + 1}: {report.summary()}")
        # Peak Python memory of one more (dry) run, traced apart from the timed ones.
        tracemalloc.start()
        reconcile_storage(db, store, grace_seconds=60, dry_run=True)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        last: dict[str, Any] = runs[-1]["report"]
        assert (last["tmp_deleted"], last["quarantined"], last["missing"]) == (
            ANOMALIES["tmp"], ANOMALIES["rowless"], ANOMALIES["missing"]), last
        seconds = median([float(r["seconds"]) for r in runs])
        return {"backend": backend, **shape, "runs": runs, "peak_traced_mb": round(peak_mb, 1),
                "median_seconds": seconds, "files_per_second": shape["files"] / seconds}
    finally:
        db.dispose()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    workdir = OUT_DIR / "reconcile"
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    sqlite_db = workdir / "node.db"
    sqlite_db.unlink(missing_ok=True)
    results.append(run(f"sqlite:///{sqlite_db}", "sqlite", workdir, args.files, args.reps))
    sqlite_db.unlink(missing_ok=True)
    if pg_available():
        with pg_schema("reconcile") as url:
            results.append(run(url, "postgresql", workdir, args.files, args.reps))
    else:
        log("PostgreSQL not available: SQLite only")
    path = write_json("reconcile.json", {"machine": machine_info(), "files": args.files, "results": results})
    for r in results:
        print(f"{r['backend']}: {r['files']} files, median {r['median_seconds']:.2f} s "
              f"({r['files_per_second']:.0f} files/s), runs: "
              + ", ".join(f"{x['seconds']:.2f} s" for x in r["runs"]) + f"; peak {r['peak_traced_mb']} MB traced")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
