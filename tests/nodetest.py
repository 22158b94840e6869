"""Helpers shared by the test suite (import as ``from nodetest import ...``;
``tests/`` is on sys.path through pytest's ``pythonpath`` setting).

A test that needs a service (PostgreSQL, Redis, dcmtk, Orthanc, ...) calls
:func:`require`; when ``PACS_NODE_REQUIRE_SERVICES=1`` (set by ``.ci/run``) a
missing service FAILS the test instead of skipping it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from pacs_node.config import Settings, load_settings

PG_URL = os.environ.get("PACS_NODE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PACS_NODE_TEST_REDIS", "redis://127.0.0.1:6379/15")
REQUIRE = os.environ.get("PACS_NODE_REQUIRE_SERVICES") == "1"


def require(ok: bool, what: str) -> None:
    """Skip (locally) or fail (CI) when a required service or tool is missing."""
    if ok:
        return
    if REQUIRE:
        pytest.fail(f"required service/tool not available: {what}", pytrace=False)
    pytest.skip(f"not available: {what}")


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_tool(name: str) -> str:
    """Path of a system tool. dcmtk's tools are looked up in /usr/bin first:
    pynetdicom installs Python apps of the same names (storescu, echoscu...)
    into the virtualenv's bin directory."""
    path = f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else shutil.which(name)
    require(path is not None, f"command {name!r}")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_entry(name: str, token: str, scopes: Sequence[str]) -> dict[str, object]:
    """One ``[[http.tokens]]`` entry for ``token`` (only its SHA-256, as in a real configuration)."""
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": list(scopes)}


def token_config(name: str, token: str, scopes: Sequence[str]) -> str:
    """The ``[[http.tokens]]`` TOML table of ``token``, for a test's configuration file
    (after the ``[http]`` keys, or anywhere before the next table)."""
    e = token_entry(name, token, scopes)
    return f'[[http.tokens]]\nname = "{e["name"]}"\nsha256 = "{e["sha256"]}"\nscopes = {json.dumps(e["scopes"])}\n'


def tokens_env(*tokens: tuple[str, str, Sequence[str]]) -> str:
    """``http.tokens`` as JSON, for ``make_settings(..., http__tokens=tokens_env(("name", TOKEN, ["read"])))``."""
    return json.dumps([token_entry(*t) for t in tokens])


def _pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


#: The bearer token configured by :func:`make_settings` (scopes read and write):
#: every HTTP request of a test still has to send it (``headers=TEST_AUTH``).
TEST_TOKEN = "pn_test-token-" + "0" * 32
TEST_AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def make_settings(tmp_path: Path, db_url: str, **overrides: object) -> Settings:
    """Settings for a test: loopback, free ports, everything under tmp_path, and
    one HTTP token, :data:`TEST_TOKEN` (override with ``http__tokens=tokens_env(...)``
    or ``http__tokens="[]"``; left out with ``http__allow_unauthenticated``)."""
    env = {
        "PACS_NODE_STORAGE__ROOT": str(tmp_path / "storage"),
        "PACS_NODE_DATABASE__URL": db_url,
        "PACS_NODE_DICOM__PORT": "0",
        "PACS_NODE_HTTP__PORT": "0",
        "PACS_NODE_STORAGE__MIN_FREE_BYTES": "0",
    }
    if "http__allow_unauthenticated" not in overrides:
        env["PACS_NODE_HTTP__TOKENS"] = tokens_env(("test", TEST_TOKEN, ["read", "write"]))
    for key, value in overrides.items():
        env["PACS_NODE_" + key.upper()] = str(value)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return load_settings(None)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
