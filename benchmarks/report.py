"""Print the Markdown tables of docs/benchmarks.md from the published results
(``benchmarks/results/*.json``), so that the document quotes exactly what the
benchmark scripts measured.

    python benchmarks/report.py [ingest|e2e|scaleout|machine ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, md_table


def load(name: str) -> dict[str, Any] | None:
    p = RESULTS_DIR / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def machine(d: dict[str, Any]) -> str:
    m = d["machine"]
    return (f"{m['date']}, commit {m['git_commit']}: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, "
            f"disk {m['disk']} (fsync of a new 512 KiB file {m['file_fsync_ms']} ms, of a directory "
            f"{m['dir_fsync_ms']} ms, medians), kernel {m['kernel']}, Python {m['python']}, "
            f"{m['dcmtk'].strip('$ ')}, {m['orthanc']}; load average at start {m['loadavg_at_start']} "
            f"(shared machine)")


def ingest() -> None:
    d = load("ingest")
    if d is None:
        return
    print(f"`{d['command']}` — {machine(d)}; {d['n']} instances of {d['instance_bytes']} bytes, {d['reps']} reps\n")
    rows = []
    for s in d["summary"].values():
        if "target" not in s:
            continue
        rows.append([s["label"], s["assocs"], s["images_per_s_median"], f"{s['images_per_s_min']}–{s['images_per_s_max']}",
                     s["mb_per_s_median"]])
    rows.sort(key=lambda r: (r[1], -r[2]))
    print(md_table(["receiver", "associations", "images/s (median)", "min–max", "MB/s (median)"], rows))
    print()
    rr = [[k.split("/")[0], k.split("/")[1], k.split("/")[2], v["median"], f"{v['min']}–{v['max']}"]
          for k, v in d["summary"].get("ratios", {}).items()]
    print(md_table(["", "÷", "associations", "ratio (median of the per-repetition ratios)", "min–max"], rr))
    diag = d.get("diagnostics") or {}
    if diag:
        print()
        rows = []
        for k, v in diag.items():
            if k.startswith("durable"):
                rows.append([k, f"{v['files_per_s_median']} files/s ({v['ms_per_file_median']} ms each)", v["what"]])
            elif k.startswith("pynetdicom"):
                rows.append([k, f"{v['pynetdicom_noop_images_per_s']} images/s, {v['cpu_ms_per_instance']} CPU ms/instance",
                             "pynetdicom SCP answering 0x0000 without storing, storescu, same files"])
            else:
                rows.append([k, (f"{v['images_per_s']} images/s, {v['cpu_ms_per_instance']} CPU ms/instance, "
                                f"{v['cpu_utilisation']} cores busy, {v['commits_per_request']} commits/instance"),
                             "node's DimseServer + Ingestor in-process, SQLite"])
        print(md_table(["diagnostic", "result (median)", "what"], rows))


def e2e() -> None:
    d = load("e2e")
    if d is None:
        return
    print(f"`{d['command']}` — {machine(d)}\n\nmodel: {d['model_how']}; stable_seconds = {d['stable_seconds']}\n")
    sizes = list(d["summary"])
    rows = []
    for z in sizes:
        s = d["summary"][z]
        rows.append([z, s["e2e_s_median"], f"{s['e2e_s_min']}–{s['e2e_s_max']}", s["model_compute_s_median"],
                     f"{100 * s['overhead_fraction_median']:.1f} %", f"{100 * s['overhead_excl_receive_stable_median']:.1f} %"])
    print(md_table(["slices", "E2E s (median)", "min–max", "model compute s = `inference` (incl. preprocessing)",
                    "overhead (E2E − compute) / E2E", "same, excluding receive and stable wait"], rows))
    print()
    stages = list(next(iter(d["summary"].values()))["stages_s_median"])
    srows = [[k] + [d["summary"][z]["stages_s_median"][k] for z in sizes] for k in stages]
    srows.append(["(not accounted)"] + [d["summary"][z]["unaccounted_s_median"] for z in sizes])
    print(md_table(["stage, median s"] + [f"{z} slices" for z in sizes], srows))
    w = d.get("warmup") or {}
    if w:
        print(f"\nwarm-up study ({w['slices']} slices, first job of the worker): E2E {w['e2e_s']} s, "
              f"queue_wait {w['stages_s']['queue_wait']} s, load {w['stages_s']['load']} s")
    for extra in ("e2e-profile", "e2e-whatif-erode0"):
        x = load(extra)
        if x:
            r = x["runs"][0]
            print(f"\n{extra}: `{x['command']}` ({x['machine']['date']}, load {x['machine']['loadavg_at_start']}): "
                  f"{r['slices']} slices E2E {r['e2e_s']} s, inference {r['model_compute_s']} s, stages {r['stages_s']}")
            if x.get("worker_profile"):
                print(md_table(["worker time by function (py-spy, inclusive)", "s"],
                               [[k, v] for k, v in x["worker_profile"].items()]))


def scaleout() -> None:
    d = load("scaleout")
    if d is None:
        return
    print(f"`{d['command']}` — {machine(d)}\n\nmodel: {d['model_how']}\n")
    res = d["results"]
    base = res[0]
    print(md_table(["workers", "torch threads each", "studies × slices", "wall s", "studies/hour (median)", "each run",
                    "vs 1 worker", "inference s/study", "postprocess s", "build s", "delivery s", "send s/study"],
                   [[r["workers"], r["torch_threads_per_worker"], f"{r['studies']} × {r['slices']}", r["wall_s"],
                     r["studies_per_hour"], ", ".join(map(str, r.get("studies_per_hour_all", [r["studies_per_hour"]]))),
                     f"{r['studies_per_hour'] / base['studies_per_hour']:.2f}×",
                     r["per_study_median_s"]["inference"], r["per_study_median_s"]["postprocess"],
                     r["per_study_median_s"]["build"], r["per_study_median_s"]["delivery"],
                     r["send_s_per_study_median"]] for r in res]))
    print(f"\nrows per study: {base['rows_per_study']}; bytes received per study: {base['bytes_in_per_study']}")


def main() -> int:
    parts = sys.argv[1:] or ["ingest", "e2e", "scaleout"]
    for p in parts:
        print(f"\n<!-- {p} -->\n")
        {"ingest": ingest, "e2e": e2e, "scaleout": scaleout}[p]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
