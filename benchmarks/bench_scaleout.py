"""Scale-out, measured locally: studies/hour with 1 and 2 ``pacs-node worker``
processes in the production shape (Redis broker + PostgreSQL, the node with
``[queue] start_worker = false``).

    python benchmarks/bench_scaleout.py [--workers 1,2] [--studies 6] [--slices 64] [--publish]

For each worker count: a fresh PostgreSQL schema, fresh queue names on Redis
127.0.0.1:6379 (so nothing else on the broker is touched), ``pacs-node serve``
(``stable_seconds = 1``), k workers (``--queues gpu,io``, concurrency 1,
torch threads = cores / k so that k workers share the 2 cores without
oversubscription) and dcmtk storescp as the destination. One warm-up study
per worker loads the model in every worker; then ``--studies`` synthetic MR
studies (``--slices`` x 256 x 256) are sent back to back with storescu and the
clock runs from the first send to the last job ``done`` (SQL). Per-study costs
(receive, inference, build, delivery, SQL rows, queue messages, bytes) are
recorded for the N-worker arithmetic in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import resolve_model
from common import (
    IMG_DIR,
    OUT_DIR,
    REDIS_URL,
    RESULTS_DIR,
    log,
    machine_info,
    md_table,
    median,
    mr_volume,
    node,
    pg_available,
    pg_schema,
    send_parallel,
    storescp,
    tcp_open,
    worker_process,
    write_json,
    write_mr_series,
)


def jobs_state(db_url: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from pacs_node.db.models import Job, Study
    from pacs_node.db.session import Database

    db = Database(db_url)
    try:
        with db.sessionmaker() as s:
            rows = s.execute(select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)).all()
            return [{"id": j.id, "state": j.state, "study_uid": uid, "timings": dict(j.timings or {}),
                     "worker": j.worker_host, "created": j.created_at.timestamp(),
                     "finished": j.finished_at.timestamp() if j.finished_at else None,
                     "instances": j.instance_count} for j, uid in rows]
    finally:
        db.dispose()


def table_counts(db_url: str) -> dict[str, int]:
    from sqlalchemy import text

    from pacs_node.db.session import Database

    db = Database(db_url)
    try:
        with db.engine.connect() as c:
            return {t: int(c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                    for t in ("studies", "series", "instances", "jobs", "job_events", "outputs", "delivery_attempts")}
    finally:
        db.dispose()


def wait_jobs(db_url: str, uids: set[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in jobs_state(db_url) if j["study_uid"] in uids]
        if len(jobs) >= len(uids) and all(j["state"] == "done" for j in jobs):
            return jobs
        bad = [j for j in jobs if j["state"] in ("failed", "delivery_failed", "skipped")]
        if bad:
            raise RuntimeError(f"jobs failed: {bad}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not done after {timeout} s: {[(j['id'], j['state']) for j in jobs]}")
        time.sleep(0.25)


def run(workers: int, volume: Any, warm: Any, n_studies: int, model: Path, work: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tag = uuid.uuid4().hex[:8]
    threads = max(1, (os.cpu_count() or 2) // workers)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_schema("bench_scale"))
        dest = stack.enter_context(storescp(work / "received", aet="ARCHIVE"))
        extra = ('[outputs]\nseg_when_empty = "empty"\n'
                 f'[[destinations]]\nname = "archive"\nkind = "dimse"\nhost = "127.0.0.1"\nport = {dest.port}\n'
                 'ae_title = "ARCHIVE"\n')
        # Fresh queue names (environment overrides of [queue]) so nothing else on the broker is touched.
        qenv = {"PACS_NODE_QUEUE__GPU_QUEUE": f"bench-gpu-{tag}", "PACS_NODE_QUEUE__IO_QUEUE": f"bench-io-{tag}"}
        n = stack.enter_context(node(work / "node", db_url=url, broker=REDIS_URL, start_worker=False,
                                     stable_seconds=1.0, model=model, extra=extra, env=qenv))
        wenv = {**qenv, "PACS_NODE_ENGINE__NUM_THREADS": str(threads)}
        for k in range(workers):
            stack.enter_context(worker_process(n.config, work / f"worker{k}.log", env=wenv))
        # Warm-up: one small study per worker, so every worker has its model loaded.
        warm_uids = set()
        for k in range(workers):
            uid, files = write_mr_series(warm, work / f"warm{k}")
            send_parallel(files, n.dicom_port, aec=n.ae_title)
            warm_uids.add(uid)
        wait_jobs(n.db_url, warm_uids, timeout=600)
        counts0 = table_counts(n.db_url)
        studies = [write_mr_series(volume, work / f"study{i}") for i in range(n_studies)]
        nbytes = sum(p.stat().st_size for _, files in studies for p in files)
        t0 = time.time()
        send_s = []
        for _, files in studies:
            r = send_parallel(files, n.dicom_port, aec=n.ae_title)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            send_s.append(r.seconds)
        t_sent = time.time()
        jobs = wait_jobs(n.db_url, {u for u, _ in studies}, timeout=3600)
        t_done = max(j["finished"] for j in jobs)
        counts1 = table_counts(n.db_url)
    wall = t_done - t0
    per = {k: round(median([j["timings"].get(k, 0.0) for j in jobs]), 3)
           for k in ("queue_wait", "load", "inference", "postprocess", "build", "delivery")}
    return {
        "workers": workers, "torch_threads_per_worker": threads, "studies": n_studies,
        "slices": int(volume.shape[0]), "wall_s": round(wall, 2), "send_s_total": round(t_sent - t0, 2),
        "send_s_per_study_median": round(median(send_s), 3),
        "studies_per_hour": round(n_studies / wall * 3600, 1),
        "per_study_median_s": per, "bytes_in_per_study": nbytes // n_studies,
        "rows_per_study": {t: (counts1[t] - counts0[t]) / n_studies for t in counts0},
        "workers_used": sorted({str(j["worker"]).rsplit("/", 1)[0] + "/" + str(j["worker"]).rsplit("/", 1)[-1]
                                for j in jobs}),
        "jobs": jobs,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [r["workers"] for r in results]
    ys = [r["studies_per_hour"] for r in results]
    bars = ax.bar([str(x) for x in xs], ys, color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xlabel("pacs-node worker processes (2 CPU cores, no GPU)")
    ax.set_ylabel("studies / hour")
    ax.set_title(f"{results[0]['studies']} MR studies x {results[0]['slices']} slices, Redis + PostgreSQL", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=2, help="repetitions; worker counts alternate (1,2 then 2,1 ...)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)
    if not pg_available():
        raise SystemExit("PostgreSQL not reachable at 127.0.0.1:5432 (db test)")
    if not tcp_open(6379):
        raise SystemExit("Redis not reachable at 127.0.0.1:6379")
    name = "scaleout" + (f"-{args.tag}" if args.tag else "")
    machine = machine_info(OUT_DIR)
    model, model_how = resolve_model(args.model)
    volume = mr_volume(args.slices, size=args.size, spacing=(200.0 / args.slices, 0.9, 0.9))
    warm = mr_volume(24, size=args.size, spacing=(8.0, 0.9, 0.9))
    counts = [int(w) for w in args.workers.split(",") if w]
    runs = []
    for rep in range(args.reps):
        for k in (counts if rep % 2 == 0 else list(reversed(counts))):
            r = run(k, volume, warm, args.studies, model, OUT_DIR / f"work-{name}")
            r["rep"] = rep
            runs.append(r)
            log(f"rep {rep}, {k} worker(s): {r['studies_per_hour']} studies/h, wall {r['wall_s']} s, "
                f"per study {r['per_study_median_s']}")
    results = []
    for k in counts:
        rs = [r for r in runs if r["workers"] == k]
        best = sorted(rs, key=lambda r: r["studies_per_hour"])[len(rs) // 2]  # the median run
        results.append({**best, "studies_per_hour": round(median([r["studies_per_hour"] for r in rs]), 1),
                        "studies_per_hour_all": [r["studies_per_hour"] for r in rs],
                        "wall_s": round(median([r["wall_s"] for r in rs]), 2)})
    shutil.rmtree(OUT_DIR / f"work-{name}", ignore_errors=True)
    payload = {"benchmark": "scaleout", "command": "python benchmarks/bench_scaleout.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine, "model": str(model), "model_how": model_how, "reps": args.reps, "results": results,
               "runs": runs}
    jpath = write_json(f"{name}.json", payload)
    png = OUT_DIR / f"{name}.png"
    plot(results, png)
    base = results[0]["studies_per_hour"]
    print(md_table(["workers", "torch threads each", "studies", "wall s", "studies/hour", "speed-up",
                    "inference s/study (median)", "build s", "delivery s", "receive s/study"],
                   [[r["workers"], r["torch_threads_per_worker"], r["studies"], r["wall_s"], r["studies_per_hour"],
                     f"{r['studies_per_hour'] / base:.2f}x", r["per_study_median_s"]["inference"],
                     r["per_study_median_s"]["build"], r["per_study_median_s"]["delivery"],
                     r["send_s_per_study_median"]] for r in results]))
    print(f"\nrows per study: {results[0]['rows_per_study']}")
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
