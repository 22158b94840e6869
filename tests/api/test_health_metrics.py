"""``/healthz`` against a stopped and a running broker, the model check, and
``/metrics`` (Prometheus text format) with values from a seeded database."""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api_seed import AUTH, FakeDispatcher, gradient_series, ingest, seed
from nodetest import REDIS_URL, make_settings, require, tcp_open
from pacs_node.api.app import create_app
from pacs_node.node import Node
from pacs_node.queue import CeleryDispatcher


def _model(tmp_path: Path) -> tuple[Path, bytes]:
    data = b"not really a torch checkpoint\x00" * 1000
    path = tmp_path / "models" / "demo.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path, data


def _node(tmp_path: Path, db_url: str, **overrides: object) -> Node:
    return Node.from_settings(make_settings(tmp_path, db_url, **overrides), migrate=True)


@pytest.fixture
def redis_queues() -> Iterator[dict[str, str]]:
    """Queue names of their own on the test Redis database, deleted afterwards."""
    require(tcp_open("127.0.0.1", 6379), "Redis at 127.0.0.1:6379")
    tag = uuid.uuid4().hex[:8]
    names = {"queue__broker_url": REDIS_URL, "queue__gpu_queue": f"gpu-{tag}", "queue__io_queue": f"io-{tag}"}
    yield names
    r = redis.Redis.from_url(REDIS_URL)
    keys = [k for k in r.scan_iter(f"*{tag}*")]
    if keys:
        r.delete(*keys)
    r.close()


def test_healthz_reports_stopped_broker(tmp_path: Path, sqlite_url: str) -> None:
    model, _ = _model(tmp_path)
    node = _node(tmp_path, sqlite_url, queue__broker_url="redis://127.0.0.1:1/0", engine=json.dumps({"model": str(model)}))
    try:
        with TestClient(create_app(node), headers=AUTH) as c:  # the dispatcher is built lazily
            start = time.monotonic()
            r = c.get("/healthz")
            elapsed = time.monotonic() - start
        body = r.json()
        assert r.status_code == 503, body
        assert body["ok"] is False
        assert body["checks"]["broker"]["ok"] is False and body["checks"]["broker"]["error"]
        assert body["checks"]["database"] == {"ok": True, "backend": "sqlite"}
        assert body["checks"]["storage"]["ok"] is True and body["checks"]["model"]["ok"] is True
        assert elapsed < 15
    finally:
        node.close()


def test_healthz_ok_with_running_redis(tmp_path: Path, sqlite_url: str, redis_queues: dict[str, str]) -> None:
    model, data = _model(tmp_path)
    node = _node(tmp_path, sqlite_url, engine=json.dumps({"model": str(model)}), **redis_queues)
    dispatcher = CeleryDispatcher(node.settings)
    try:
        with TestClient(create_app(node, dispatcher=dispatcher), headers=AUTH) as c:
            r = c.get("/healthz")
            assert c.get("/livez").json() == {"ok": True}
        body = r.json()
        assert r.status_code == 200, body
        checks = body["checks"]
        assert body["ok"] is True and checks["broker"]["ok"] is True and checks["broker"]["latency_ms"] >= 0
        assert checks["model"] == {
            "ok": True,
            "path": str(model),
            "size_bytes": len(data),
            "sha256_prefix": hashlib.sha256(data).hexdigest()[:12],
        }
        assert checks["storage"]["writable"] is True and checks["storage"]["free_bytes"] > 0
    finally:
        dispatcher.close()
        node.close()


def test_healthz_reports_missing_model(tmp_path: Path, sqlite_url: str) -> None:
    missing = tmp_path / "nowhere" / "model.pt"
    node = _node(tmp_path, sqlite_url, engine=json.dumps({"model": str(missing)}))
    try:
        with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
            r = c.get("/healthz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["model"] == {"ok": False, "path": str(missing), "error": "missing"}
        assert checks["broker"] == {"ok": True, "checked": False} and checks["database"]["ok"] is True
    finally:
        node.close()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(family: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_metrics_from_seeded_database(node: Node) -> None:
    """On SQLite and PostgreSQL; the broker is a fake without queue depths."""
    seed(node)
    extra = gradient_series(2, 8, 8)
    ingest(node, extra)
    ingest(node, extra[:1])  # a re-send: receive_count 2
    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = _families(r.text)

    received = fams["pacs_node_instances_received"]
    assert received.type == "counter"
    assert _samples(received, "pacs_node_instances_received_total") == {(): 3 * 4 + 2 + 1}

    jobs = fams["pacs_node_jobs"]
    assert jobs.type == "gauge"
    by_state = {dict(k)["state"]: v for k, v in _samples(jobs, "pacs_node_jobs").items()}
    assert by_state["done"] == 1 and by_state["failed"] == 1 and by_state["queued"] == 1
    assert by_state["running"] == 0 and len(by_state) == 9

    stages = fams["pacs_node_stage_duration_seconds"]
    assert stages.type == "histogram"
    counts = {dict(k)["stage"]: v for k, v in _samples(stages, "pacs_node_stage_duration_seconds_count").items()}
    sums = {dict(k)["stage"]: v for k, v in _samples(stages, "pacs_node_stage_duration_seconds_sum").items()}
    assert counts == {"queue_wait": 2, "load": 2, "inference": 1, "postprocess": 1, "build": 1, "delivery": 1}
    assert sums["load"] == pytest.approx(1.8) and sums["inference"] == pytest.approx(12.0)
    buckets = {
        (dict(k)["stage"], dict(k)["le"]): v
        for k, v in _samples(stages, "pacs_node_stage_duration_seconds_bucket").items()
    }
    assert buckets[("load", "0.25")] == 0 and buckets[("load", "0.5")] == 1
    assert buckets[("load", "1.0")] == 1 and buckets[("load", "2.5")] == 2 and buckets[("load", "+Inf")] == 2
    assert buckets[("inference", "10.0")] == 0 and buckets[("inference", "30.0")] == 1

    deliveries = fams["pacs_node_delivery_attempts"]
    assert deliveries.type == "counter"
    assert {dict(k)["status"]: v for k, v in _samples(deliveries, "pacs_node_delivery_attempts_total").items()} == {
        "error": 1,
        "success": 1,
    }
    assert "pacs_node_queue_depth" in fams and fams["pacs_node_queue_depth"].samples == []


def test_metrics_queue_depth_from_redis(tmp_path: Path, sqlite_url: str, redis_queues: dict[str, str]) -> None:
    node = _node(tmp_path, sqlite_url, **redis_queues)
    dispatcher = CeleryDispatcher(node.settings)
    try:
        dispatcher.enqueue_process(101)
        dispatcher.enqueue_process(102)
        dispatcher.enqueue_delivery(103)
        with TestClient(create_app(node, dispatcher=dispatcher), headers=AUTH) as c:
            fams = _families(c.get("/metrics").text)
        depth = {dict(k)["queue"]: v for k, v in _samples(fams["pacs_node_queue_depth"], "pacs_node_queue_depth").items()}
        assert depth == {redis_queues["queue__gpu_queue"]: 2, redis_queues["queue__io_queue"]: 1}
        assert _samples(fams["pacs_node_broker_up"], "pacs_node_broker_up") == {(): 1}
        assert _samples(fams["pacs_node_instances_received"], "pacs_node_instances_received_total") == {(): 0}
    finally:
        dispatcher.close()
        node.close()


def test_metrics_omit_queue_depth_when_broker_down(tmp_path: Path, sqlite_url: str) -> None:
    node = _node(tmp_path, sqlite_url, queue__broker_url="redis://127.0.0.1:1/0")
    try:
        with TestClient(create_app(node), headers=AUTH) as c:
            r = c.get("/metrics")
        assert r.status_code == 200
        fams = _families(r.text)
        assert fams["pacs_node_queue_depth"].samples == []
        assert _samples(fams["pacs_node_broker_up"], "pacs_node_broker_up") == {(): 0}
        assert not any(math.isnan(s.value) for f in fams.values() for s in f.samples)
    finally:
        node.close()
