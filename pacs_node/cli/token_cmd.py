"""``pacs-node token``: make HTTP bearer tokens for ``[[http.tokens]]``.

* ``pacs-node token create --name NAME --scopes read,write`` prints a new
  random token (once: it is stored nowhere) and the ``[[http.tokens]]`` table
  with its SHA-256, to paste into the node's configuration.
* ``pacs-node token hash --name NAME --scopes read`` reads an existing token
  (e.g. from a secret manager) on standard input and prints its table.
* ``--append-to FILE`` appends the table to a configuration file instead
  (``create`` then prints only the token).

Neither command reads the configuration or the database.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from pydantic import ValidationError

from pacs_node.api.auth import hash_token, new_token
from pacs_node.cli.common import die
from pacs_node.config import TOKEN_SCOPES, HttpToken

__all__ = ["register", "token_table"]


def token_table(name: str, sha256: str, scopes: list[str]) -> str:
    """The TOML table of one token.

    Parameters
    ----------
    name:
        Token name.
    sha256:
        Hex SHA-256 of the token.
    scopes:
        Its scopes.

    Returns
    -------
    str
        ``[[http.tokens]]`` with ``name``, ``sha256``, ``scopes``.
    """
    return (f"[[http.tokens]]\nname = {json.dumps(name)}\nsha256 = \"{sha256}\"\n"
            f"scopes = {json.dumps(scopes)}\n")


def _scopes(value: str) -> list[str]:
    scopes = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in TOKEN_SCOPES]
    if unknown or not scopes:
        raise argparse.ArgumentTypeError(f"scopes are a comma-separated subset of {', '.join(TOKEN_SCOPES)}")
    return scopes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="make HTTP bearer tokens ([[http.tokens]])")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    for action, text in (("create", "print a new random token and its [[http.tokens]] table"),
                         ("hash", "print the [[http.tokens]] table of a token read from standard input")):
        a = tsub.add_parser(action, help=text)
        a.add_argument("--name", required=True, help="who holds the token (e.g. worker-gpu1, orthanc, alice)")
        a.add_argument("--scopes", required=True, type=_scopes,
                       help="comma-separated: read (WADO-RS, API reads, dashboard), write (STOW-RS, retry, "
                            "analyze), admin (everything)")
        a.add_argument("--append-to", metavar="FILE", type=Path, default=None,
                       help="append the [[http.tokens]] table to this TOML configuration file (created if "
                            "missing) instead of printing it")
        a.set_defaults(func=cmd_create if action == "create" else cmd_hash)


def _table(args: argparse.Namespace, token: str) -> str | None:
    try:
        entry = HttpToken(name=args.name, sha256=hash_token(token), scopes=args.scopes)
    except ValidationError as exc:
        first = exc.errors()[0]
        die(f"invalid token {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
        return None
    return token_table(entry.name, entry.sha256, list(entry.scopes))


def _append(path: Path, table: str) -> str | None:
    """Append ``table`` to a TOML file; an error message, or ``None``."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    text = old + ("" if not old or old.endswith("\n") else "\n") + ("\n" if old else "") + table
    try:
        tokens = tomllib.loads(text).get("http", {}).get("tokens", [])
    except tomllib.TOMLDecodeError as exc:
        return f"{path} would not be valid TOML with the token table ({exc}); nothing written"
    name = tomllib.loads(table)["http"]["tokens"][0]["name"]
    if sum(1 for t in tokens if isinstance(t, dict) and t.get("name") == name) > 1:
        return f"{path} already has a token named {name!r}; nothing written"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text[len(old):])
    return None


def cmd_create(args: argparse.Namespace) -> int:
    """Print a new token and its table (or append the table to a file).

    Returns
    -------
    int
        0, or 2 for an invalid name or a file that cannot take the table.
    """
    token = new_token()
    table = _table(args, token)
    if table is None:
        return 2
    if args.append_to is not None:
        error = _append(args.append_to, table)
        if error is not None:
            return die(error)
        print(f"# token {args.name!r} (its hash was added to {args.append_to}): shown once, stored nowhere",
              file=sys.stderr)
        print(token)
        return 0
    print(f"# token {args.name!r}: shown once, stored nowhere; give it to its holder through a secret store")
    print(token)
    print("# add to the node's configuration (only the hash is kept there):")
    print(table, end="")
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    """Print the table of a token read from standard input.

    Returns
    -------
    int
        0, or 2 for an empty input or an invalid name.
    """
    token = sys.stdin.readline().strip()
    if len(token) < 32:
        return die("read a token of at least 32 characters on standard input (use `pacs-node token create`)")
    table = _table(args, token)
    if table is None:
        return 2
    if args.append_to is not None:
        error = _append(args.append_to, table)
        return die(error) if error is not None else 0
    print(table, end="")
    return 0
