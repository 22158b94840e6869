"""Profile the node's C-STORE path with py-spy while storescu sends N CT slices.

    python benchmarks/profile_ingest.py [--n 300] [--assocs 1] [--nofsync] [--pg]

Writes ``benchmarks/out/profile-ingest.txt`` (py-spy collapsed stacks, all
threads, idle frames excluded) and prints the functions with the most
inclusive samples among the association threads.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, log, make_ct_series, node, pg_schema, send_parallel


def summarize(raw: Path, top: int = 40) -> str:
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "handle_store" not in stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        seen = set()
        for f in frames:
            key = f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
            if key not in seen:
                incl[key] += n
                seen.add(key)
        last = frames[-1]
        own[last.split(" (")[0] + " (" + last.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"] += n
    out = [f"samples under handle_store: {total}", "", "inclusive:"]
    out += [f"{100 * c / max(total, 1):5.1f}%  {k}" for k, c in incl.most_common(top)]
    out += ["", "own (leaf):"]
    out += [f"{100 * c / max(total, 1):5.1f}%  {k}" for k, c in own.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--assocs", type=int, default=1)
    ap.add_argument("--nofsync", action="store_true")
    ap.add_argument("--pg", action="store_true")
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--idle", action="store_true", help="also sample threads that wait (I/O, sleeps)")
    args = ap.parse_args()
    files = make_ct_series(500, OUT_DIR / "data" / "ct512-500")[: args.n]
    work = OUT_DIR / "work-profile"
    shutil.rmtree(work, ignore_errors=True)
    raw = OUT_DIR / "profile-ingest.txt"
    import contextlib

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_schema("bench_prof")) if args.pg else None
        n = stack.enter_context(node(work, fsync=not args.nofsync, db_url=url))
        spy = subprocess.Popen(["py-spy", "record", "-p", str(n.process.pid), "-r", str(args.rate), "-f", "raw",
                                "-o", str(raw), "--threads"] + (["--idle"] if args.idle else []), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            res = send_parallel(files, n.dicom_port, aec=n.ae_title, associations=args.assocs)
            log(f"{res.n / res.seconds:.1f} img/s (rc {res.returncode})")
        finally:
            spy.send_signal(2)
            spy.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)
    print(summarize(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
