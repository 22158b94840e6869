"""``pacs-node db``, ``studies`` and ``jobs`` subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from pacs_node.cli.common import add_config_arg, die, load, open_database, print_json, print_table
from pacs_node.db.migrate import current_revision, upgrade
from pacs_node.db.session import Database
from pacs_node.jobs.queries import get_job, list_jobs, list_studies
from pacs_node.jobs.states import JobState

__all__ = ["domain_line", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply the Alembic migrations")
    add_config_arg(up)
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
    cur = dbsub.add_parser("current", help="print the schema revision")
    add_config_arg(cur)
    cur.set_defaults(func=cmd_db_current)

    studies = sub.add_parser("studies", help="received studies")
    ssub = studies.add_subparsers(dest="studies_command", required=True)
    sl = ssub.add_parser("list", help="list studies, newest first")
    add_config_arg(sl)
    sl.add_argument("--json", action="store_true", help="one JSON array on stdout")
    sl.add_argument("--limit", type=int, default=100)
    sl.set_defaults(func=cmd_studies_list)

    jobs = sub.add_parser("jobs", help="analysis jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jl = jsub.add_parser("list", help="list jobs, newest first")
    add_config_arg(jl)
    jl.add_argument("--state", choices=[s.value for s in JobState])
    jl.add_argument("--study", dest="study_uid", help="StudyInstanceUID")
    jl.add_argument("--limit", type=int, default=100)
    jl.add_argument("--json", action="store_true", help="one JSON array on stdout")
    jl.set_defaults(func=cmd_jobs_list)
    js = jsub.add_parser("show", help="one job with its events")
    add_config_arg(js)
    js.add_argument("job_id", type=int, metavar="ID")
    js.add_argument("--json", action="store_true", help="one JSON object on stdout")
    js.set_defaults(func=cmd_jobs_show)
    jr = jsub.add_parser("retry", help="run a finished job again (re-deliver a delivery_failed job)")
    add_config_arg(jr)
    jr.add_argument("job_id", type=int, metavar="ID")
    jr.add_argument("--json", action="store_true", help="one JSON object on stdout")
    jr.set_defaults(func=cmd_jobs_retry)


def _db(args: argparse.Namespace) -> Database:
    """The database of a read command (never created; one line when absent)."""
    return open_database(load(args, quiet=True), args)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = load(args)
    db = Database(settings.database.url)
    try:
        upgrade(db, args.revision)
        print(f"database at revision {current_revision(db)}")
    finally:
        db.dispose()
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    db = _db(args)
    try:
        print(current_revision(db) or "(empty)")
    finally:
        db.dispose()
    return 0


def cmd_studies_list(args: argparse.Namespace) -> int:
    db = _db(args)
    try:
        with db.sessionmaker() as s:
            studies = list_studies(s, limit=args.limit)
    finally:
        db.dispose()
    if args.json:
        print_json([x.model_dump(mode="json") for x in studies])
    else:
        print_table(
            [
                dict(
                    id=x.id,
                    study_uid=x.study_instance_uid,
                    accession=x.accession_number,
                    series=len(x.series),
                    instances=x.num_instances,
                    version=x.version,
                    calling_aet=x.calling_aet,
                    last_received=x.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
                    interrupted=x.interrupted_reason,
                )
                for x in studies
            ],
            ["id", "study_uid", "accession", "series", "instances", "version", "calling_aet", "last_received",
             "interrupted"],
        )
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    db = _db(args)
    try:
        with db.sessionmaker() as s:
            jobs = list_jobs(s, state=args.state, study_uid=args.study_uid, limit=args.limit)
    finally:
        db.dispose()
    if args.json:
        print_json([j.model_dump(mode="json") for j in jobs])
    else:
        print_table(
            [
                dict(
                    id=j.id,
                    state=j.state,
                    study_uid=j.study_instance_uid,
                    ver=j.study_version,
                    modality=",".join(j.modalities),
                    instances=j.instance_count,
                    score=None if j.study_score is None else f"{j.study_score:.3f}",
                    created=j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    error=(j.error or "")[:60] or None,
                )
                for j in jobs
            ],
            ["id", "state", "study_uid", "ver", "modality", "instances", "score", "created", "error"],
        )
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    db = _db(args)
    try:
        with db.sessionmaker() as s:
            job = get_job(s, args.job_id)
    finally:
        db.dispose()
    if job is None:
        return die(f"job {args.job_id} not found", 1)
    if args.json:
        print_json(job.model_dump(mode="json"))
        return 0
    d = job.model_dump()
    for key in ("id", "state", "study_instance_uid", "study_version", "modalities", "instance_count",
                "series_count", "reason", "attempts", "worker_host", "created_at", "queued_at",
                "started_at", "finished_at", "study_score", "error"):
        print(f"{key:20} {'' if d[key] is None else d[key]}")
    if job.timings:
        print("timings (s):        " + ", ".join(f"{k}={v:.3f}" for k, v in job.timings.items()))
    if job.findings:
        print(f"{'domain:':20} {domain_line(job.findings)}")
    print("events:")
    for e in job.events:
        print(f"  {e.at:%Y-%m-%d %H:%M:%S}  {e.from_state or '-':>15} -> {e.to_state:<15} {e.message or ''}")
    if job.deliveries:
        print("deliveries:")
        for a in job.deliveries:
            code = "" if a.status_code is None else f" {a.status_code:#06x}"
            print(f"  {a.started_at:%Y-%m-%d %H:%M:%S}  {a.destination} #{a.attempt}: {a.status}{code} {a.error or ''}")
    if job.commitments:
        print("storage commitment:")
        for c in job.commitments:
            counts = {st: sum(1 for i in c.instances if i.status == st) for st in ("committed", "failed", "pending")}
            print(f"  {c.requested_at:%Y-%m-%d %H:%M:%S}  {c.destination} #{c.attempt}: {c.state} "
                  + ", ".join(f"{n} {st}" for st, n in counts.items() if n) + (f"  {c.error}" if c.error else ""))
    return 0


def domain_line(findings: dict[str, Any]) -> str:
    """The training-domain check of a job's findings, in one line.

    Parameters
    ----------
    findings:
        The job's ``findings`` JSON.

    Returns
    -------
    str
        ``"within the training domain"``, ``"OUTSIDE the training domain: <warnings>"``
        or ``"not checked"`` (a model without a training-domain record).
    """
    domain = findings.get("domain")
    if not isinstance(domain, dict) or not domain:
        return "not checked"
    if domain.get("in_domain", True):
        return "within the training domain"
    warnings = [str(w) for w in domain.get("warnings") or []]
    return "OUTSIDE the training domain" + (": " + "; ".join(warnings) if warnings else "")


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from pacs_node.jobs.actions import JobBusyError, JobNotFoundError, retry_job
    from pacs_node.queue import CeleryDispatcher

    settings = load(args, quiet=True)
    db = open_database(settings, args)
    dispatcher = CeleryDispatcher(settings)
    try:
        retry_job(db, dispatcher, args.job_id)
        with db.sessionmaker() as s:
            job = get_job(s, args.job_id)
    except JobNotFoundError as exc:
        return die(str(exc), 1)
    except JobBusyError as exc:
        return die(f"{exc}; retry it once it has finished", 1)
    finally:
        dispatcher.close()
        db.dispose()
    assert job is not None
    if args.json:
        print_json({"job_id": job.id, "state": job.state})
    else:
        print(f"job {job.id} is {job.state}")
    return 0
