"""Helpers shared by CLI subcommands: settings loading, output formatting."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs_node.config import ConfigError, Settings, load_settings, resolve_config_file
from pacs_node.logging_setup import configure_logging

if TYPE_CHECKING:
    from pacs_node.db.session import Database

__all__ = ["add_config_arg", "die", "load", "open_database", "print_json", "print_table"]


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


def open_database(settings: Settings, args: argparse.Namespace) -> Database:
    """The node's database for a command that reads it: never created here.

    Raises
    ------
    SystemExit
        Code 2 with one line when the SQLite file does not exist, the
        database cannot be reached, or it has no pacs-node tables.
    """
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from pacs_node.db.session import Database

    url = make_url(settings.database.url)
    source = resolve_config_file(getattr(args, "config", None))
    where = f"database.url from {source}" if source else "database.url: the built-in default, no config file found"
    hint = "pass --config FILE or set PACS_NODE_CONFIG to the node's configuration"
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(str(url.database)).expanduser().resolve()
        if not path.is_file():
            raise SystemExit(die(f"no database at {path} ({where}); "
                                 f"`pacs-node serve` creates it, or {hint}"))
    db = Database(settings.database.url)
    try:
        tables = set(inspect(db.engine).get_table_names())
    except SQLAlchemyError as exc:
        db.dispose()
        reason = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        raise SystemExit(die(f"cannot reach the database {url.render_as_string(hide_password=True)}: {reason}"))
    if "jobs" not in tables:
        db.dispose()
        raise SystemExit(die(f"the database {url.render_as_string(hide_password=True)} ({where}) has no pacs-node "
                             f"tables; run `pacs-node db upgrade`, or {hint}"))
    return db


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
