"""``pacs-node serve``."""

from __future__ import annotations

import argparse

from pacs_node.cli.common import add_config_arg, die, load
from pacs_node.node import SchemaOutdatedError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the node: DICOM SCP, HTTP API, study assembler")
    add_config_arg(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = load(args)
    from pacs_node.serve import serve

    try:
        return serve(settings, getattr(args, "config", None))
    except SchemaOutdatedError as exc:
        return die(str(exc))
    except OSError as exc:
        return die(f"cannot start: {exc}")
