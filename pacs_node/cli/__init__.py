"""The ``pacs-node`` command line.

Subcommands of this package: ``serve``, ``db``, ``studies``, ``jobs``, ``analyze``,
``storage``, ``token``.
Other installed packages add theirs through the ``pacs_node.commands``
entry-point group (``worker`` adds ``train``, ``calibrate``, ``evaluate``,
``worker``): each entry point is a ``register(subparsers)`` function whose
subcommands set ``func(args) -> int``. pacs_node never imports them directly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from pacs_node.cli import data_cmds, pull_cmd, serve_cmd, token_cmd, storage_cmd

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-node", description="PACS-integrated anomaly detection node")
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file (default: $PACS_NODE_CONFIG)")
    parser.add_argument("--log-level", default=None, help="override logging.level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve_cmd.register(sub)
    data_cmds.register(sub)
    pull_cmd.register(sub)
    token_cmd.register(sub)
    storage_cmd.register(sub)
    for ep in sorted(entry_points(group="pacs_node.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the node's CLI
            logger.debug("command plugin %s unavailable: %s", ep.name, exc)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pacs-node`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Subcommands accept --config after their name too.
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
