"""``pacs-node analyze STUDY_UID [--source NAME]``: analyse a study now,
pulling it from a configured ``[[sources]]`` archive first.

Runs in its own process against the node's database and storage (the same
configuration file as ``serve``): the study is retrieved (WADO-RS, C-GET, or
C-MOVE to the node's running SCP) and stored, then the job is created and
handed to the queue, where the node's workers pick it up.

Exit codes: 0 job created; 1 the study is not on the source / not stored,
the source is unreachable or failed; 2 bad configuration or arguments.
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import logging

from pacs_node.cli.common import add_config_arg, die, load, print_json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="analyse a study now (pull it from a [[sources]] archive first)",
                       description="Create an analysis job for a study. With --source, retrieve the study "
                                   "from that configured archive first (QIDO/WADO-RS, C-GET or C-MOVE).")
    add_config_arg(p)
    p.add_argument("study_uid", metavar="STUDY_UID", help="Study Instance UID")
    p.add_argument("--source", metavar="NAME", help="name of a [[sources]] table to pull the study from")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    settings = load(args, quiet=True)
    if not getattr(args, "log_level", None):
        # Failures are reported in one line below; pynetdicom would log them too.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from pacs_node.db.models import Job
    from pacs_node.jobs.actions import StudyNotFoundError, analyze_study
    from pacs_node.jobs.routing import parse_rules
    from pacs_node.node import Node, SchemaOutdatedError
    from pacs_node.pull.base import PullError
    from pacs_node.pull.service import PullService
    from pacs_node.queue import CeleryDispatcher

    try:
        rules = parse_rules(settings.routing)
    except ValueError as exc:
        return die(f"invalid configuration: routing: {str(exc).splitlines()[0]}")
    try:
        node = Node.from_settings(settings)
    except SchemaOutdatedError as exc:
        return die(str(exc))
    dispatcher = None
    try:
        try:
            service = PullService(node)
        except ValueError as exc:
            return die(str(exc))
        dispatcher = CeleryDispatcher(settings)
        pulled = None
        summary = ""
        try:
            if args.source:
                report, job_id = service.pull_and_analyze(dispatcher, args.source, args.study_uid, rules)
                pulled, summary = report.as_dict(), report.summary()
            else:
                job_id = analyze_study(node.db, dispatcher, args.study_uid, rules)
        except PullError as exc:
            return die(str(exc), 1)
        except StudyNotFoundError as exc:
            return die(str(exc), 1)
        with node.db.sessionmaker() as s:
            job = s.get(Job, job_id)
            state = job.state if job is not None else "unknown"
    finally:
        if dispatcher is not None:
            close = getattr(dispatcher, "close", None)
            if close is not None:
                close()
        node.close()
    if args.json:
        print_json({"job_id": job_id, "state": state, "study_uid": args.study_uid, "pulled": pulled})
    else:
        line = f"job {job_id} {state} for study {args.study_uid}"
        if summary:
            line += f": {summary}"
        print(line)
    return 0
