"""Helpers shared by CLI subcommands: settings loading, output formatting."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pacs_node.config import ConfigError, Settings, load_settings
from pacs_node.logging_setup import configure_logging

__all__ = ["add_config_arg", "die", "load", "print_json", "print_table"]


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help="TOML configuration file")


def die(message: str, code: int = 2) -> int:
    print(f"pacs-node: {message}", file=sys.stderr)
    return code


def load(args: argparse.Namespace, *, quiet: bool = False) -> Settings:
    """Validated settings for a subcommand; raises SystemExit(2) with one line on error."""
    try:
        settings = load_settings(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"pacs-node: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    level = getattr(args, "log_level", None) or settings.logging.level
    configure_logging("WARNING" if quiet and not getattr(args, "log_level", None) else level,
                      json_format=settings.logging.json_format)
    return settings


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table; empty cells for None."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if not rows:
        print("(none)")
