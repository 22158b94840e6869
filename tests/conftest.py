"""Shared fixtures: real databases (SQLite file and PostgreSQL schema per
test), real storage, the node. Helper functions live in ``nodetest.py``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from nodetest import PG_URL, _pg_schema_url, make_settings, require
from pacs_node.config import Settings
from pacs_node.node import Node


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, calibrated) U-Net checkpoint, trained once per session."""
    from worker.engine.demo import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")
