"""End to end: an MR study (a FLAIR head generated from the MNI template, with one lesion) held by Orthanc, pushed to pacs-node
(``POST /modalities/pacsnode/store``), analysed, and the SEG + SR delivered
back to Orthanc (C-STORE). Wall time from the store request until the SEG and
the SR are both found in Orthanc (REST polled every 0.1 s), with the per-stage
breakdown from the node's SQL (``jobs.timings``, job events, study receive times).

    python benchmarks/bench_e2e.py [--slices 200,400] [--reps 3] [--model PATH] [--publish]

The node runs as ``pacs-node serve`` with its embedded defaults (SQLite,
embedded queue, the worker process ``serve`` starts, fsync on) except:
``stable_seconds = 1`` (the assembler's quiet period, reported separately),
``[[destinations]]`` = the Orthanc, ``outputs.seg_when_empty = "empty"`` (so
that a SEG always comes back), engine on CPU with all cores. One small study
is sent first so that the worker has loaded the model (its cold figures are
reported as the warm-up row); every measured study is a new study (fresh UIDs,
same voxels per size), the sizes alternate across repetitions.

Model: ``./pacs-node-data/models/demo.pt`` when it exists, else the shipped
demo model ``pacs_node/data/demo-model.pt``, else
``benchmarks/out/models/demo-fast.pt`` (trained here on first use with
``worker.engine.demo.train_synthetic(demo_config(fast=True))``, ~1 min: same
U-Net architecture and inference input size as the full demo model, fewer
training steps); ``--model`` overrides.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    IMG_DIR,
    OUT_DIR,
    REPO,
    RESULTS_DIR,
    NodeProc,
    Orthanc,
    free_port,
    log,
    machine_info,
    md_table,
    median,
    mr_volume,
    node,
    orthanc,
    send_parallel,
    write_json,
    write_mr_series,
)

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9903
STAGES = ["push", "stable_wait", "enqueue", "queue_wait", "load", "inference", "postprocess", "build",
          "to_delivery", "delivery", "visible"]


def resolve_model(arg: str | None) -> tuple[Path, str]:
    if arg:
        return Path(arg).resolve(), f"given: {arg}"
    demo = REPO / "pacs-node-data" / "models" / "demo.pt"
    if demo.exists():
        return demo, "pacs-node-data/models/demo.pt (the demo model)"
    shipped = REPO / "pacs_node" / "data" / "demo-model.pt"
    if shipped.exists():
        return shipped, "pacs_node/data/demo-model.pt (the shipped demo model, `pacs-node train --anatomy`)"
    fast = OUT_DIR / "models" / "demo-fast.pt"
    if not fast.exists():
        log("training the fast synthetic demo model (~1 min)")
        from worker.engine.demo import demo_config, train_synthetic

        fast.parent.mkdir(parents=True, exist_ok=True)
        train_synthetic(fast, demo_config(fast=True), device="cpu", progress=False, model_name="synthetic-demo-fast")
    return fast, "benchmarks/out/models/demo-fast.pt (train_synthetic(demo_config(fast=True)), trained by this script)"


def whatif_model(model: Path, erode_mm: float) -> Path:
    """A copy of ``model`` whose scoring ``erode_mm`` is changed (WHAT-IF experiments only: it changes
    the model's output; used to measure how much of the E2E time the foreground erosion takes)."""
    import torch

    ck = torch.load(model, map_location="cpu", weights_only=False)
    meta = json.loads(ck["meta"]) if isinstance(ck["meta"], str) else dict(ck["meta"])
    meta["scoring"]["erode_mm"] = float(erode_mm)
    ck["meta"] = json.dumps(meta) if isinstance(ck["meta"], str) else meta
    out = OUT_DIR / "models" / f"{model.stem}-whatif-erode{erode_mm:g}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, out)
    return out


def model_description(path: Path) -> dict[str, Any]:
    try:
        import torch

        ck = torch.load(path, map_location="cpu", weights_only=False)
        meta = ck.get("meta", {}) if isinstance(ck, dict) else {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        keep = {k: meta.get(k) for k in ("model_name", "code_version", "arch", "preprocess") if k in meta}
        keep["scoring_erode_mm"] = meta.get("scoring", {}).get("erode_mm")
        return keep
    except Exception as exc:  # noqa: BLE001 - description only
        return {"error": str(exc)[:200]}


def orthanc_study_id(o: Orthanc, study_uid: str) -> str:
    hits = o.post("/tools/lookup", study_uid)
    return next(h["ID"] for h in hits if h["Type"] == "Study")


def outputs_present(o: Orthanc, study_uid: str) -> bool:
    found = o.post("/tools/find", {"Level": "Series", "Expand": True,
                                   "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG\\SR"}})
    numbers = {str(s["MainDicomTags"].get("SeriesNumber", "")) for s in found}
    return str(SEG_SERIES_NUMBER) in numbers and str(SR_SERIES_NUMBER) in numbers


def job_record(n: NodeProc, study_uid: str) -> dict[str, Any]:
    from sqlalchemy import select

    from pacs_node.db.models import Job, JobEvent, Study
    from pacs_node.db.session import Database

    db = Database(n.db_url)
    try:
        with db.sessionmaker() as s:
            study = s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()
            job = s.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())).scalars().first()
            if job is None:
                return {"study_first": study.first_received_at.timestamp(),
                        "study_last": study.last_received_at.timestamp(), "instances": study.num_instances}
            events = s.execute(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).scalars()
            return {
                "job_id": job.id, "state": job.state, "instances": study.num_instances,
                "study_first": study.first_received_at.timestamp(), "study_last": study.last_received_at.timestamp(),
                "created": job.created_at.timestamp(),
                "queued": job.queued_at.timestamp() if job.queued_at else None,
                "started": job.started_at.timestamp() if job.started_at else None,
                "finished": job.finished_at.timestamp() if job.finished_at else None,
                "timings": dict(job.timings or {}), "findings": dict(job.findings or {}),
                "events": [{"at": e.at.timestamp(), "to": e.to_state, "msg": e.message} for e in events],
            }
    finally:
        db.dispose()


def run_study(o: Orthanc, n: NodeProc, volume: Any, label: str, work: Path, timeout: float = 900) -> dict[str, Any]:
    study_uid, files = write_mr_series(volume, work / "study")
    res = send_parallel(files, o.dicom_port, aec=o.aet)
    if res.returncode != 0:
        raise RuntimeError(f"storescu to Orthanc failed: {res.stderr}")
    oid = orthanc_study_id(o, study_uid)
    push: dict[str, float] = {}

    def do_push() -> None:
        try:
            o.post("/modalities/pacsnode/store", {"Resources": [oid], "Synchronous": True}, timeout=timeout)
            push["done"] = time.time()
        except Exception as exc:  # noqa: BLE001 - reported below
            push["error"] = str(exc)  # type: ignore[assignment]

    t0 = time.time()
    th = threading.Thread(target=do_push, daemon=True)
    th.start()
    deadline = time.monotonic() + timeout
    while not outputs_present(o, study_uid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: no SEG+SR in Orthanc after {timeout} s: {job_record(n, study_uid)}")
        if "error" in push:
            raise RuntimeError(f"{label}: push failed: {push['error']}")
        time.sleep(0.1)
    t_end = time.time()
    th.join(timeout=60)
    # The SEG and the SR can be in Orthanc before the job is recorded done (the
    # anomaly map may still be in flight): wait for the record, outside the E2E time.
    rec = job_record(n, study_uid)
    settle = time.monotonic() + 60
    while rec.get("state") != "done" and time.monotonic() < settle:
        time.sleep(0.2)
        rec = job_record(n, study_uid)
    tm = rec["timings"]
    events = rec["events"]
    delivering = [e["at"] for e in events if e["to"] == "delivering"]
    e2e = t_end - t0
    stages = {
        "push": rec["study_last"] - t0,  # store request -> last instance committed on the node
        "stable_wait": rec["created"] - rec["study_last"],  # assembler quiet period + scheduler tick
        "enqueue": (rec["queued"] or rec["created"]) - rec["created"],
        "queue_wait": tm.get("queue_wait", 0.0),
        "load": tm.get("load", 0.0),
        "inference": tm.get("inference", 0.0),
        "postprocess": tm.get("postprocess", 0.0),
        "build": tm.get("build", 0.0),
    }
    # From the end of the build to the start of the delivery task (rows saved,
    # delivery enqueued on the io queue, picked up), then the delivery itself.
    processing_end = (rec["started"] or 0) + stages["load"] + stages["inference"] + stages["postprocess"] + stages["build"]
    delivery_start = delivering[-1] if len(delivering) >= 2 else (delivering[0] if delivering else processing_end)
    stages["to_delivery"] = max(0.0, delivery_start - processing_end)
    stages["delivery"] = tm.get("delivery", 0.0)
    # job done -> seen by the REST poll (negative when SEG + SR were seen before the job was recorded done)
    stages["visible"] = t_end - (rec["finished"] or t_end)
    accounted = sum(stages.values())
    compute = stages["inference"]
    out = {
        "label": label, "slices": int(volume.shape[0]), "study_uid": study_uid, "e2e_s": round(e2e, 3),
        "push_request_s": round(push.get("done", t_end) - t0, 3), "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "unaccounted_s": round(e2e - accounted, 3), "model_compute_s": round(compute, 3),
        "overhead_fraction": round((e2e - compute) / e2e, 4),
        "overhead_fraction_excluding_receive_and_stable_wait": round(
            (e2e - stages["push"] - stages["stable_wait"] - compute) / (e2e - stages["push"] - stages["stable_wait"]), 4),
        "job_id": rec["job_id"], "findings": rec["findings"], "instances_on_node": rec["instances"],
        "job_timings": tm,
    }
    httpx_delete(o, f"/studies/{oid}")
    shutil.rmtree(work / "study", ignore_errors=True)
    return out


def httpx_delete(o: Orthanc, path: str) -> None:
    import httpx

    httpx.delete(o.url + path, timeout=60)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def summarize_profile(raw: Path, top: int = 45) -> str:
    """Inclusive share of the worker's samples per function (py-spy collapsed stacks)."""
    import collections

    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        seen = set()
        for f in stack.split(";"):
            name = f.split(" (")[0]
            where = f.split(" (")[-1].split(":")[0] if " (" in f else ""
            key = f"{name} ({'/'.join(where.split('/')[-2:])})"
            if key not in seen:
                seen.add(key)
                incl[key] += n
    lines = [f"samples: {total}"]
    lines += [f"{100 * c / max(total, 1):5.1f}%  {k}" for k, c in incl.most_common(top)]
    return "\n".join(lines)


PROFILE_ITEMS = [
    ("job (_process_claimed)", ["_process_claimed"]),
    ("load_series (read the DICOM files)", ["_process_claimed", "load_series"]),
    ("Predictor.predict", ["Predictor.predict"]),
    ("  components: preprocess", ["Predictor.components", "preprocess"]),
    ("  components: erode_mm (foreground erosion on the source grid)", ["Predictor.components", "erode_mm"]),
    ("  components: Predictor.reconstruct (U-Net forward)", ["Predictor.components", "Predictor.reconstruct"]),
    ("  components: maps back to the source grid", ["Predictor.components", "Predictor.components.<locals>.<dictcomp>"]),
    ("  finalize (3D post-processing)", ["Predictor.predict", "Predictor.finalize"]),
    ("    finalize: study_score (np.partition)", ["Predictor.finalize", "study_score"]),
    ("    finalize: clean_mask", ["Predictor.finalize", "clean_mask"]),
    ("build_job_outputs", ["build_job_outputs"]),
    ("  write_outputs: validate_file (re-read + dciodvfy)", ["build_job_outputs", "validate_file"]),
    ("  write_outputs: save_as", ["build_job_outputs", "write_outputs", "Dataset.save_as"]),
    ("  build_sr", ["build_job_outputs", "build_sr"]),
    ("  build_anomaly_map", ["build_job_outputs", "build_anomaly_map"]),
    ("  build_seg", ["build_job_outputs", "build_seg"]),
    ("deliver_job (C-STORE to Orthanc)", ["deliver_job"]),
]


def profile_breakdown(raw: Path, rate: int) -> dict[str, float]:
    """Seconds of worker time per item (a stack counts when it holds the chain's functions in order)."""
    totals = {label: 0 for label, _ in PROFILE_ITEMS}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        names = [f.split(" (")[0] for f in stack.split(";")]
        for label, chain in PROFILE_ITEMS:
            i = 0
            for nm in names:
                if i < len(chain) and nm == chain[i]:
                    i += 1
            if i == len(chain):
                totals[label] += int(count)
    return {k: round(v / rate, 1) for k, v in totals.items()}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["slices"] for r in runs})
    med = {z: {k: median([r["stages_s"][k] for r in runs if r["slices"] == z]) for k in STAGES} for z in sizes}
    fig, ax = plt.subplots(figsize=(9, 3.2 + 0.4 * len(sizes)))
    colors = plt.get_cmap("tab20").colors
    for i, z in enumerate(sizes):
        left = 0.0
        for j, k in enumerate(STAGES):
            w = med[z][k]
            ax.barh(i, w, left=left, color=colors[j % len(colors)], label=k if i == 0 else None)
            if w > 2.5:
                ax.text(left + w / 2, i, f"{w:.1f}", ha="center", va="center", fontsize=7)
            left += w
        e2e = median([r["e2e_s"] for r in runs if r["slices"] == z])
        ax.text(left + 0.5, i, f"E2E {e2e:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(sizes)))
    ax.set_yticklabels([f"{z} slices" for z in sizes])
    ax.set_xlabel("seconds (median per stage)")
    ax.set_title("Orthanc -> pacs-node -> SEG + SR in Orthanc (2 CPU cores, no GPU)")
    ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="200,400")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="rows = columns (default 256)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--whatif-erode-mm", type=float, default=None,
                    help="WHAT-IF: run with a copy of the model whose scoring erode_mm is this value (not the product)")
    ap.add_argument("--stable-seconds", type=float, default=1.0)
    ap.add_argument("--extra-config", default="", help="TOML appended to the node's config (experiments)")
    ap.add_argument("--pyspy", action="store_true",
                    help="record the worker with py-spy during the measured studies (out/<name>-worker-profile.txt)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(z) for z in args.slices.split(",") if z]
    name = "e2e" + (f"-{args.tag}" if args.tag else "")
    work = OUT_DIR / f"work-{name}"
    shutil.rmtree(work, ignore_errors=True)
    machine = machine_info(OUT_DIR)
    model, model_how = resolve_model(args.model)
    if args.whatif_erode_mm is not None:
        model = whatif_model(model, args.whatif_erode_mm)
        model_how = f"WHAT-IF copy of {model_how} with scoring.erode_mm = {args.whatif_erode_mm:g}"
    log(f"model {model} ({model_how})")
    spacing = {z: (200.0 / z, 0.9, 0.9) for z in sizes}
    volumes = {z: mr_volume(z, size=args.size, spacing=spacing[z]) for z in sizes}
    warm = mr_volume(24, size=args.size, spacing=(8.0, 0.9, 0.9))
    node_dicom, node_http = free_port(), free_port()
    runs: list[dict[str, Any]] = []
    warmup: dict[str, Any] = {}
    worker_profile: dict[str, float] = {}
    t_start = time.time()
    with orthanc(work / "orthanc", modalities={"pacsnode": ["PACSNODE", "127.0.0.1", node_dicom]}) as o:
        dest = (f'[[destinations]]\nname = "orthanc"\nkind = "dimse"\nhost = "127.0.0.1"\nport = {o.dicom_port}\n'
                f'ae_title = "{o.aet}"\n')
        extra = f'[outputs]\nseg_when_empty = "empty"\n{args.extra_config}\n{dest}'
        with node(work / "node", start_worker=True, stable_seconds=args.stable_seconds, model=model, extra=extra,
                  dicom_port=node_dicom, http_port=node_http, log_level="INFO") as n:
            warmup = run_study(o, n, warm, "warm-up (first job: model load)", work)
            log(f"warm-up: E2E {warmup['e2e_s']} s, stages {warmup['stages_s']}")
            spy = None
            worker_profile: dict[str, float] = {}
            raw = OUT_DIR / f"{name}-worker-profile.raw"
            if args.pyspy:
                import subprocess

                workers = children(n.process.pid)
                spy = subprocess.Popen(["py-spy", "record", "--subprocesses", "-p", str(workers[0]), "-r", "50",
                                        "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            try:
                for rep in range(args.reps):
                    order = sizes if rep % 2 == 0 else list(reversed(sizes))
                    for z in order:
                        r = run_study(o, n, volumes[z], f"{z} slices", work)
                        r["rep"] = rep
                        runs.append(r)
                        log(f"rep {rep} {z} slices: E2E {r['e2e_s']} s, inference {r['model_compute_s']} s, "
                            f"overhead {100 * r['overhead_fraction']:.1f}% stages {r['stages_s']}")
            finally:
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(timeout=120)
            if spy is not None:
                (OUT_DIR / f"{name}-worker-profile.txt").write_text(summarize_profile(raw))
                worker_profile = profile_breakdown(raw, 50)
    summary: dict[str, Any] = {}
    for z in sizes:
        rs = [r for r in runs if r["slices"] == z]
        summary[str(z)] = {
            "e2e_s_median": round(median([r["e2e_s"] for r in rs]), 2),
            "e2e_s_min": min(r["e2e_s"] for r in rs), "e2e_s_max": max(r["e2e_s"] for r in rs),
            "model_compute_s_median": round(median([r["model_compute_s"] for r in rs]), 2),
            "overhead_fraction_median": round(median([r["overhead_fraction"] for r in rs]), 4),
            "overhead_excl_receive_stable_median": round(
                median([r["overhead_fraction_excluding_receive_and_stable_wait"] for r in rs]), 4),
            "stages_s_median": {k: round(median([r["stages_s"][k] for r in rs]), 3) for k in STAGES},
            "unaccounted_s_median": round(median([r["unaccounted_s"] for r in rs]), 3),
        }
    payload = {"benchmark": "e2e", "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine, "model": str(model), "model_how": model_how,
               "model_description": model_description(model), "size": args.size, "spacing": spacing,
               "stable_seconds": args.stable_seconds, "wall_seconds": round(time.time() - t_start, 1),
               "warmup": warmup, "summary": summary, "runs": runs,
               "worker_profile": worker_profile}
    jpath = write_json(f"{name}.json", payload)
    png = OUT_DIR / f"{name}.png"
    plot(runs, png)
    rows = []
    for z in sizes:
        s = summary[str(z)]
        rows.append([z, s["e2e_s_median"], f"{s['e2e_s_min']}–{s['e2e_s_max']}", s["model_compute_s_median"],
                     f"{100 * s['overhead_fraction_median']:.1f} %",
                     f"{100 * s['overhead_excl_receive_stable_median']:.1f} %"])
    print(md_table(["slices", "E2E s (median)", "min–max", "inference s (incl. preprocessing)",
                    "overhead (E2E−inference)/E2E", "overhead excl. receive + stable wait"], rows))
    print()
    srows = [[k] + [summary[str(z)]["stages_s_median"][k] for z in sizes] for k in STAGES]
    srows.append(["(unaccounted)"] + [summary[str(z)]["unaccounted_s_median"] for z in sizes])
    print(md_table(["stage (median s)"] + [f"{z} slices" for z in sizes], srows))
    print(f"\nwarm-up (cold model, {warm.shape[0]} slices): E2E {warmup['e2e_s']} s, load {warmup['stages_s']['load']} s")
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
