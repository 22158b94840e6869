"""Shared fixtures: real databases (SQLite file and PostgreSQL schema per
test), real storage, the node, and its DIMSE server on a free loopback port.

A test that needs a service (PostgreSQL, Redis, dcmtk, Orthanc, ...) calls
:func:`require`; when ``PACS_NODE_REQUIRE_SERVICES=1`` (set by ``.ci/run``) a
missing service FAILS the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from pacs_node.config import Settings, load_settings
from pacs_node.node import Node

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


@pytest.fixture(scope="session")
def pg_available() -> bool:
    try:
        eng = create_engine(PG_URL)
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


def _pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh, empty schema."""
    require(pg_available, f"PostgreSQL at {PG_URL}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    eng = create_engine(PG_URL)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield _pg_schema_url(schema)
    finally:
        with eng.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'node.db'}"


def make_settings(tmp_path: Path, db_url: str, **overrides: object) -> Settings:
    """Settings for a test: loopback, free ports, everything under tmp_path."""
    env = {
        "PACS_NODE_STORAGE__ROOT": str(tmp_path / "storage"),
        "PACS_NODE_DATABASE__URL": db_url,
        "PACS_NODE_DICOM__PORT": "0",
        "PACS_NODE_HTTP__PORT": "0",
        "PACS_NODE_STORAGE__MIN_FREE_BYTES": "0",
    }
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


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, db_url)


@pytest.fixture
def node(settings: Settings) -> Iterator[Node]:
    n = Node.from_settings(settings, migrate=True)
    try:
        yield n
    finally:
        n.close()
