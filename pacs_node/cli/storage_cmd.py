"""``pacs-node storage reconcile``: the start-up storage reconciliation, by hand."""

from __future__ import annotations

import argparse

from pacs_node.cli.common import add_config_arg, die, load, print_json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    storage = sub.add_parser("storage", help="the instance storage root")
    ssub = storage.add_subparsers(dest="storage_command", required=True)
    rc = ssub.add_parser(
        "reconcile",
        help="delete leftover temporary files, quarantine files without a row, report rows without a file",
        description="Make the storage root and the instances table agree (what the node does at start): "
        "delete leftover .incoming-*.tmp files, move files that have no instances row to "
        "<storage root>/.quarantine/<UTC time>/, report rows whose file is missing. Safe beside a "
        "running node: files younger than --grace seconds are left alone.",
    )
    add_config_arg(rc)
    rc.add_argument("--dry-run", action="store_true", help="count only; delete and move nothing")
    rc.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="leave files younger than this (default: storage.reconcile_grace_seconds)")
    rc.add_argument("--force", action="store_true",
                    help="quarantine row-less files even beyond storage.quarantine_limit")
    rc.add_argument("--json", action="store_true", help="the report as one JSON object on stdout")
    rc.set_defaults(func=cmd_storage_reconcile)


def cmd_storage_reconcile(args: argparse.Namespace) -> int:
    """Run one reconciliation; exit 1 when row-less files were over the limit (nothing moved)."""
    from pacs_node.ingest.reconcile import reconcile_storage
    from pacs_node.node import Node, SchemaOutdatedError

    settings = load(args, quiet=args.json)
    if args.grace is not None and args.grace < 0:
        return die("--grace must be >= 0")
    try:
        node = Node.from_settings(settings)
    except SchemaOutdatedError as exc:
        return die(str(exc))
    try:
        grace = settings.storage.reconcile_grace_seconds if args.grace is None else args.grace
        report = reconcile_storage(node.db, node.store, grace_seconds=grace,
                                   quarantine_limit=settings.storage.quarantine_limit,
                                   dry_run=args.dry_run, force=args.force)
    finally:
        node.close()
    if args.json:
        print_json(report.as_dict())
    else:
        print(("dry run: " if args.dry_run else "") + report.summary())
        if report.missing_ids:
            print("instances without a file (first ids): " + ", ".join(map(str, report.missing_ids)))
        if report.refused:
            print("row-less files exceed storage.quarantine_limit: nothing moved (use --force)")
    return 1 if report.refused else 0
