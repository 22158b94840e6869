"""Ingest throughput: N synthetic 512x512 16-bit CT slices sent by dcmtk
storescu to pacs-node, dcmtk storescp and Orthanc, in the same run with the
same files, the order of the receivers rotated on every repetition.

    python benchmarks/bench_ingest.py [--n 500] [--reps 5] [--assocs 1,4]
        [--targets node,storescp,orthanc,node-pg,node-nofsync] [--publish]

Every run gets a fresh receiver (new storage directory, new database) so that
nothing is a duplicate; the time is the wall time of the storescu process(es)
(association set-up included, receiver start-up excluded). Between runs the
page cache is flushed (``sync``) so one receiver's write-back does not land in
the next one's timing.

Receivers:

* ``node``: ``pacs-node serve`` with the embedded defaults (SQLite, fsync on,
  the durability rule), ``start_worker = false``, ``stable_seconds = 3600``.
* ``node-pg``: the same on PostgreSQL 127.0.0.1:5432/test (fresh schema).
* ``node-nofsync``: DIAGNOSTIC ONLY, ``storage.fsync = false`` (not the
  product configuration: it breaks the durability rule for files; SQLite
  still commits with synchronous=FULL).
* ``storescp``: dcmtk ``storescp -od DIR`` (its defaults: no fsync).
* ``orthanc``: Debian's Orthanc with its default storage (no fsync of files).

Writes ``benchmarks/out/ingest.json`` and ``ingest.png``; ``--publish`` also
copies them to ``benchmarks/results/`` and ``docs/img/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    IMG_DIR,
    OUT_DIR,
    RESULTS_DIR,
    drop_caches_best_effort,
    durable_write_ceiling,
    export_tree,
    log,
    machine_info,
    make_ct_series,
    md_table,
    median,
    node,
    orthanc,
    pg_available,
    pg_schema,
    send_parallel,
    storescp,
    write_json,
)

ALL_TARGETS = ["node", "storescp", "orthanc", "node-pg", "node-nofsync"]
LABELS = {
    "node": "pacs-node (SQLite, fsync)",
    "node-pg": "pacs-node (PostgreSQL, fsync)",
    "node-nofsync": "pacs-node, storage.fsync=false (DIAGNOSTIC, not durable)",
    "storescp": "dcmtk storescp -od (no fsync)",
    "orthanc": "Orthanc 1.10 default storage",
    "node-base": "pacs-node at --baseline REV (SQLite, fsync)",
}
BASELINE_SRC: Path | None = None


@contextlib.contextmanager
def receiver(target: str, workdir: Path) -> Iterator[tuple[int, str, Any]]:
    """(port, called AE title, counter) of a fresh receiver."""
    if target == "storescp":
        with storescp(workdir / "out") as scp:
            yield scp.port, scp.aet, scp.count
    elif target == "orthanc":
        with orthanc(workdir) as o:
            yield o.dicom_port, o.aet, o.count_instances
    elif target in ("node", "node-nofsync"):
        with node(workdir, fsync=(target == "node")) as n:
            yield n.dicom_port, n.ae_title, n.count_instances
    elif target == "node-base":
        assert BASELINE_SRC is not None
        with node(workdir, env={"PYTHONPATH": str(BASELINE_SRC)}) as n:
            yield n.dicom_port, n.ae_title, n.count_instances
    elif target == "node-pg":
        with pg_schema("bench_ingest") as url, node(workdir, db_url=url) as n:
            yield n.dicom_port, n.ae_title, n.count_instances
    else:
        raise ValueError(target)


def run_one(target: str, files: list[Path], assocs: int, workdir: Path) -> dict[str, Any]:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        with receiver(target, workdir) as (port, aec, count):
            res = send_parallel(files, port, aec=aec, associations=assocs)
            stored = count()
        if res.returncode != 0 or stored != len(files):
            raise RuntimeError(f"{target}: storescu rc={res.returncode}, stored {stored}/{len(files)}\n{res.stderr}")
        return {"target": target, "assocs": assocs, "seconds": round(res.seconds, 4),
                "images_per_s": round(res.n / res.seconds, 2), "mb_per_s": round(res.nbytes / 1e6 / res.seconds, 2)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        drop_caches_best_effort()


def summarize(runs: list[dict[str, Any]], targets: list[str], assocs_list: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for a in assocs_list:
        for t in targets:
            rs = [r for r in runs if r["target"] == t and r["assocs"] == a]
            if not rs:
                continue
            ips = [r["images_per_s"] for r in rs]
            summary[f"{t}/{a}"] = {
                "target": t, "assocs": a, "label": LABELS[t], "reps": len(rs),
                "images_per_s_median": round(median(ips), 1), "images_per_s_min": min(ips),
                "images_per_s_max": max(ips),
                "mb_per_s_median": round(median([r["mb_per_s"] for r in rs]), 1),
            }
        # Ratios measured within the same repetition, then the median of those.
        for ref in ("storescp", "orthanc", "node-base"):
            for t in targets:
                if not t.startswith("node") or t == ref or (ref == "node-base" and t != "node"):
                    continue
                ratios = []
                for rep in {r["rep"] for r in runs}:
                    mine = [r for r in runs if r["rep"] == rep and r["target"] == t and r["assocs"] == a]
                    theirs = [r for r in runs if r["rep"] == rep and r["target"] == ref and r["assocs"] == a]
                    if mine and theirs:
                        ratios.append(mine[0]["images_per_s"] / theirs[0]["images_per_s"])
                if ratios:
                    summary.setdefault("ratios", {})[f"{t}/{ref}/{a}"] = {
                        "median": round(median(ratios), 3), "min": round(min(ratios), 3),
                        "max": round(max(ratios), 3), "per_rep": [round(x, 3) for x in ratios]}
    return summary


def run_diagnostics(n: int, reps: int = 3) -> dict[str, Any]:
    """Floors that explain the node's figures, measured right after the runs."""
    import subprocess

    here = Path(__file__).resolve().parent
    out: dict[str, Any] = {}
    for threads in (1, 4):
        runs = [durable_write_ceiling(OUT_DIR, threads=threads, n=200) for _ in range(reps)]
        out[f"durable_write_sequence_{threads}_thread"] = {
            "files_per_s_median": median([r["files_per_s"] for r in runs]),
            "ms_per_file_median": median([r["ms_per_file"] for r in runs]),
            "what": "512 KiB: write tmp + fsync + rename + fsync(dir) + one SQLite WAL commit (synchronous=FULL)"}
    for assocs in (1, 4):
        r = subprocess.run([sys.executable, str(here / "pynetdicom_floor.py"), "--n", str(n), "--reps", str(reps),
                            "--assocs", str(assocs)], capture_output=True, text=True, check=True)
        out[f"pynetdicom_noop_scp_{assocs}_assoc"] = json.loads(r.stdout.strip().splitlines()[-1])
    for assocs, extra in ((1, []), (4, []), (1, ["--nofsync"])):
        vals = []
        for _ in range(reps):
            r = subprocess.run([sys.executable, str(here / "inproc_ingest.py"), "--n", str(n), "--assocs", str(assocs),
                                *extra], capture_output=True, text=True, check=True)
            vals.append(json.loads(r.stdout.strip().splitlines()[-1]))
        key = f"node_inprocess_{assocs}_assoc" + ("_nofsync" if extra else "")
        out[key] = {k: median([v[k] for v in vals]) for k in ("images_per_s", "cpu_ms_per_instance", "cpu_utilisation")}
        out[key]["commits_per_request"] = round(median([v["commits"] / v["requests"] for v in vals]), 3)
    return out


def plot(summary: dict[str, Any], targets: list[str], assocs_list: list[int], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(assocs_list))
    for j, a in enumerate(assocs_list):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(targets):
            s = summary.get(f"{t}/{a}")
            if not s:
                continue
            xs.append(i + j * width)
            ys.append(s["images_per_s_median"])
            lo.append(max(0.0, s["images_per_s_median"] - s["images_per_s_min"]))
            hi.append(max(0.0, s["images_per_s_max"] - s["images_per_s_median"]))
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{a} association{'s' if a > 1 else ''}")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([i + width * (len(assocs_list) - 1) / 2 for i in range(len(targets))])
    ax.set_xticklabels([LABELS[t].replace(" (", "\n(").replace(", storage", "\nstorage") for t in targets], fontsize=7)
    ax.set_ylabel("images/s (median, min-max)")
    ax.set_title(f"C-STORE ingest, {n} CT slices 512x512x16 bit, storescu, loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="instances per run (default 500)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--assocs", default="1,4", help="concurrent associations to test (default 1,4)")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--pg-assocs", default="1,4", help="associations for node-pg (default 1,4)")
    ap.add_argument("--nofsync-assocs", default="1", help="associations for node-nofsync (default 1)")
    ap.add_argument("--baseline", default="", help="git revision: also run target node-base from that revision")
    ap.add_argument("--tag", default="", help="suffix of the output names (e.g. 'before')")
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="skip the floors measured after the runs (durable write sequence, pynetdicom no-op SCP, "
                         "in-process CPU per instance)")
    ap.add_argument("--publish", action="store_true", help="copy JSON to benchmarks/results/, PNG to docs/img/")
    args = ap.parse_args(argv)

    targets = [t for t in args.targets.split(",") if t]
    if args.baseline:
        global BASELINE_SRC
        BASELINE_SRC = export_tree(args.baseline)
        LABELS["node-base"] = f"pacs-node at {args.baseline} (SQLite, fsync)"
        if "node-base" not in targets:
            targets.insert(1, "node-base")
    if "node-pg" in targets and not pg_available():
        log("PostgreSQL not reachable: skipping node-pg")
        targets.remove("node-pg")
    assocs_list = [int(a) for a in args.assocs.split(",")]
    only = {"node-pg": {int(a) for a in args.pg_assocs.split(",") if a},
            "node-nofsync": {int(a) for a in args.nofsync_assocs.split(",") if a}}
    name = "ingest" + (f"-{args.tag}" if args.tag else "")
    work = OUT_DIR / "work-ingest"
    machine = machine_info(OUT_DIR)
    log(f"machine: {machine}")
    files = make_ct_series(args.n, OUT_DIR / "data" / f"ct512-{args.n}")
    log(f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")

    runs: list[dict[str, Any]] = []
    t_start = time.time()
    for rep in range(args.reps):
        order = targets[rep % len(targets):] + targets[:rep % len(targets)]
        for a in assocs_list:
            for t in order:
                if t in only and a not in only[t]:
                    continue
                r = run_one(t, files, a, work / t)
                r["rep"] = rep
                runs.append(r)
                log(f"rep {rep} {t:13s} assocs={a}: {r['images_per_s']:7.1f} img/s {r['mb_per_s']:7.1f} MB/s")
    summary = summarize(runs, targets, assocs_list)
    diagnostics = {} if args.no_diagnostics else run_diagnostics(min(args.n, 300))
    payload = {"benchmark": "ingest", "command": "python benchmarks/bench_ingest.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "n": args.n, "reps": args.reps, "instance_bytes": files[0].stat().st_size, "machine": machine,
               "wall_seconds": round(time.time() - t_start, 1), "summary": summary, "diagnostics": diagnostics, "runs": runs}
    jpath = write_json(f"{name}.json", payload)
    png = OUT_DIR / f"{name}.png"
    plot(summary, targets, assocs_list, args.n, png)

    rows = []
    for a in assocs_list:
        for t in targets:
            s = summary.get(f"{t}/{a}")
            if s:
                rows.append([s["label"], a, s["images_per_s_median"], f"{s['images_per_s_min']}–{s['images_per_s_max']}",
                             s["mb_per_s_median"]])
    print(md_table(["receiver", "assocs", "images/s (median)", "min–max", "MB/s (median)"], rows))
    print()
    rrows = [[k.split("/")[0], k.split("/")[1], k.split("/")[2], v["median"], f"{v['min']}–{v['max']}"]
             for k, v in summary.get("ratios", {}).items()]
    print(md_table(["node", "vs", "assocs", "ratio (median of per-rep)", "min–max"], rrows))
    if diagnostics:
        print("\ndiagnostics:", json.dumps(diagnostics, indent=1))
    print(f"\nJSON: {jpath}\nPNG: {png}")
    if args.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(jpath, RESULTS_DIR / jpath.name)
        shutil.copy(png, IMG_DIR / f"bench-{name}.png")
        print(f"published: {RESULTS_DIR / jpath.name}, {IMG_DIR / f'bench-{name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
