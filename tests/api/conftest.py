"""Fixtures of the REST API / dashboard tests: a seeded node and a client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api_seed import FakeDispatcher
from nodetest import make_settings
from pacs_node.api.app import create_app
from pacs_node.node import Node


@pytest.fixture
def dispatcher() -> FakeDispatcher:
    return FakeDispatcher()


@pytest.fixture
def api_node(tmp_path: Path, sqlite_url: str) -> Iterator[Node]:
    """A node on SQLite with the test token (api_seed.TOKEN, read and write) configured."""
    n = Node.from_settings(make_settings(tmp_path, sqlite_url), migrate=True)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def client(api_node: Node, dispatcher: FakeDispatcher) -> Iterator[TestClient]:
    with TestClient(create_app(api_node, dispatcher=dispatcher)) as c:
        yield c
