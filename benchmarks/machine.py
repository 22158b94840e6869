"""Machine description and storage probes for the benchmark reports
(``machine_info``, an fsync latency probe, the durable-write ceiling)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from paths import ORTHANC, OUT_DIR, REPO, STORESCU

# ---------------------------------------------------------------- machine
def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def fsync_probe(directory: Path, n: int = 30, size: int = 512 * 1024) -> dict[str, float]:
    """Median latency (ms) of fsync on a freshly written ``size``-byte file and on its directory."""
    d = directory / f".fsync-probe-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    data = os.urandom(size)
    f_ms, d_ms = [], []
    try:
        for i in range(n):
            with open(d / f"f{i}", "wb") as fh:
                fh.write(data)
                fh.flush()
                t = time.perf_counter()
                os.fsync(fh.fileno())
                f_ms.append((time.perf_counter() - t) * 1e3)
            fd = os.open(d, os.O_RDONLY)
            try:
                t = time.perf_counter()
                os.fsync(fd)
                d_ms.append((time.perf_counter() - t) * 1e3)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"file_fsync_ms": round(statistics.median(f_ms), 2), "dir_fsync_ms": round(statistics.median(d_ms), 2)}


def durable_write_ceiling(directory: Path, *, threads: int = 1, n: int = 200, size: int = 512 * 1024,
                          sqlite_commit: bool = True) -> dict[str, float]:
    """Files/s of the node's durable write sequence with no DICOM and no Python DB layer: per file
    write tmp + fsync + rename + fsync(dir) (+ one SQLite WAL commit, synchronous=FULL, when
    ``sqlite_commit``), from ``threads`` threads into one directory. An upper bound for durable ingest."""
    import sqlite3
    import threading

    d = directory / f".ceiling-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    data = os.urandom(size)
    db_lock = threading.Lock()
    con = sqlite3.connect(d / "db.sqlite", check_same_thread=False, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")

    def work(k: int) -> None:
        for i in range(k, n, threads):
            tmp, final = d / f".tmp-{i}", d / f"{i}.dcm"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if sqlite_commit:
                with db_lock:
                    con.execute("BEGIN IMMEDIATE")
                    con.execute("INSERT INTO t (name) VALUES (?)", (str(i),))
                    con.execute("COMMIT")

    try:
        t0 = time.perf_counter()
        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        secs = time.perf_counter() - t0
    finally:
        con.close()
        shutil.rmtree(d, ignore_errors=True)
    return {"threads": threads, "files_per_s": round(n / secs, 1), "ms_per_file": round(1000 * secs / n, 2)}


def machine_info(work: Path | None = None) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    target = work or OUT_DIR
    target.mkdir(parents=True, exist_ok=True)
    df = _run_text(["df", "-hT", str(target)]).splitlines()
    dev = df[-1].split()[0] if len(df) > 1 else ""
    fstype = df[-1].split()[1] if len(df) > 1 else ""
    disk = _run_text(["lsblk", "-dno", "NAME,SIZE,ROTA", dev]) if dev.startswith("/dev/") else ""
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "disk": f"{dev} {fstype} ({disk or 'virtual disk'})".strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "dcmtk": (_run_text([STORESCU, "--version"]).splitlines() or [""])[0],
        "orthanc": (_run_text([ORTHANC, "--version"]).splitlines() or [""])[0],
    }
    info.update(fsync_probe(target))
    return info
