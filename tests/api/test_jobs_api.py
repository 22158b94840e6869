"""REST API: jobs and studies (list, filter, show, retry, analyze), bearer
authentication and the published OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from api_seed import FakeDispatcher, add_output, advance
from api_seed import AUTH, FINDINGS, TIMINGS, TOKEN, seed
from nodetest import free_port, make_settings
from pacs_node.api.app import create_app
from pacs_node.jobs.states import JobState
from pacs_node.node import Node


def test_list_filter_and_show(node: Node) -> None:
    """On SQLite and PostgreSQL: newest first, filters, paging, detail, 404."""
    seeded = seed(node)
    add_output(node, seeded.done, "seg", f"job-{seeded.done}/seg.dcm", generate_uid(), generate_uid())
    add_output(node, seeded.done, "sr", f"job-{seeded.done}/sr.dcm", generate_uid(), generate_uid())
    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        jobs = c.get("/api/v1/jobs").json()
        assert [j["id"] for j in jobs] == [seeded.queued, seeded.failed, seeded.done]
        assert {j["state"] for j in jobs} == {"done", "failed", "queued"}
        first = {j["id"]: j for j in jobs}[seeded.done]
        assert first["findings_count"] == 2 and first["study_score"] == pytest.approx(0.93)
        assert first["timings"] == TIMINGS and first["modalities"] == ["CT"]
        assert first["accession_number"] == "ACC1" and first["source_series_uid"]

        assert [j["id"] for j in c.get("/api/v1/jobs", params={"state": "failed"}).json()] == [seeded.failed]
        uid = seeded.study_uids[seeded.queued]
        assert [j["id"] for j in c.get("/api/v1/jobs", params={"study_uid": uid}).json()] == [seeded.queued]
        assert c.get("/api/v1/jobs", params={"study_uid": "1.2.3"}).json() == []
        page = c.get("/api/v1/jobs", params={"limit": 1, "offset": 1}).json()
        assert [j["id"] for j in page] == [seeded.failed]
        assert c.get("/api/v1/jobs", params={"state": "bogus"}).status_code == 422
        assert c.get("/api/v1/jobs", params={"limit": 0}).status_code == 422

        detail = c.get(f"/api/v1/jobs/{seeded.done}").json()
        assert detail["state"] == "done" and detail["worker_host"] == "gpu-1"
        assert detail["timings"] == TIMINGS and detail["findings"] == FINDINGS
        assert [e["to_state"] for e in detail["events"]] == ["received", "queued", "running", "delivering", "done"]
        assert [o["kind"] for o in detail["outputs"]] == ["seg", "sr"]
        assert [(d["attempt"], d["status"], d["status_code"]) for d in detail["deliveries"]] == [
            (1, "error", None),
            (2, "success", 0),
        ]
        assert detail["deliveries"][0]["error"] == "association rejected"
        failed = c.get(f"/api/v1/jobs/{seeded.failed}").json()
        assert failed["error"].startswith("RuntimeError") and failed["findings_count"] is None

        missing = c.get("/api/v1/jobs/999999")
        assert missing.status_code == 404 and "not found" in missing.json()["detail"]

        studies = c.get("/api/v1/studies").json()
        assert len(studies) == 3 and {s["study_instance_uid"] for s in studies} == set(seeded.study_uids.values())
        assert studies[0]["series"][0]["num_instances"] == 4 and studies[0]["series"][0]["modality"] == "CT"
        assert len(c.get("/api/v1/studies", params={"limit": 2}).json()) == 2


def test_retry_requires_bearer_token(client: TestClient, api_node: Node, dispatcher: FakeDispatcher) -> None:
    seeded = seed(api_node)
    url = f"/api/v1/jobs/{seeded.failed}/retry"

    r = client.post(url)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post(url, headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = client.post(url, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401
    assert dispatcher.process == []

    r = client.post(url, headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json() == {"job_id": seeded.failed, "state": "queued"}
    assert dispatcher.process == [seeded.failed]
    events = client.get(f"/api/v1/jobs/{seeded.failed}", headers=AUTH).json()["events"]
    assert events[-1]["to_state"] == "queued" and events[-1]["message"] == "retry requested"

    busy = client.post(url, headers=AUTH)
    assert busy.status_code == 409 and "queued" in busy.json()["detail"]
    assert client.post("/api/v1/jobs/424242/retry", headers=AUTH).status_code == 404


def test_retry_of_delivery_failed_job_redelivers(client: TestClient, api_node: Node, dispatcher: FakeDispatcher) -> None:
    seeded = seed(api_node)
    job = seeded.queued
    advance(api_node, job, JobState.RUNNING, JobState.DELIVERING, JobState.DELIVERY_FAILED)
    add_output(api_node, job, "seg", f"job-{job}/seg.dcm", generate_uid(), generate_uid())
    r = client.post(f"/api/v1/jobs/{job}/retry", headers=AUTH)
    assert r.status_code == 202 and r.json()["state"] == "delivering"
    assert dispatcher.deliver == [job] and dispatcher.process == []


def test_analyze(client: TestClient, api_node: Node, dispatcher: FakeDispatcher) -> None:
    seeded = seed(api_node)
    uid = seeded.study_uids[seeded.done]

    assert client.post(f"/api/v1/studies/{uid}/analyze").status_code == 401
    missing = client.post(f"/api/v1/studies/{generate_uid()}/analyze", headers=AUTH)
    assert missing.status_code == 404 and "not stored" in missing.json()["detail"]
    unknown = client.post(f"/api/v1/studies/{uid}/analyze", headers=AUTH, json={"source": "ARCHIVE"})
    assert unknown.status_code == 400 and "unknown source" in unknown.json()["detail"]
    assert dispatcher.process == []

    r = client.post(f"/api/v1/studies/{uid}/analyze", headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "queued" and body["job_id"] not in (seeded.done, seeded.failed, seeded.queued)
    assert dispatcher.process == [body["job_id"]]
    jobs = client.get("/api/v1/jobs", params={"study_uid": uid}, headers=AUTH).json()
    assert [(j["id"], j["study_version"]) for j in jobs] == [(body["job_id"], 2), (seeded.done, 1)]


def test_analyze_with_configured_source(tmp_path: Path, sqlite_url: str) -> None:
    """With {"source": NAME} the node pulls first: an unreachable source is a 503
    (the pull itself is tested against a real Orthanc in tests/orthanc/)."""
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    settings = make_settings(
        tmp_path, sqlite_url,
        sources=json.dumps([{"name": "ARCHIVE", "kind": "dicomweb", "url": closed, "timeout": 2}]),
    )
    node = Node.from_settings(settings, migrate=True)
    try:
        dispatcher = FakeDispatcher()
        seeded = seed(node)
        with TestClient(create_app(node, dispatcher=dispatcher)) as c:
            uid = seeded.study_uids[seeded.failed]
            assert c.post(f"/api/v1/studies/{uid}/analyze", headers=AUTH, json={"source": "OTHER"}).status_code == 400
            r = c.post(f"/api/v1/studies/{uid}/analyze", headers=AUTH, json={"source": "ARCHIVE"})
            assert r.status_code == 503 and "source ARCHIVE unreachable" in r.json()["detail"], r.text
            assert dispatcher.process == []
            bad = c.post(f"/api/v1/studies/{uid}/analyze", headers=AUTH, json={"src": "ARCHIVE"})
            assert bad.status_code == 422
            r = c.post("/api/v1/studies/not-a-uid/analyze", headers=AUTH, json={"source": "ARCHIVE"})
            assert r.status_code == 400 and "StudyInstanceUID" in r.json()["detail"], r.text
            assert "not-a-uid" not in r.text  # never echoed
            # Without a source: the stored study is analysed as before.
            r = c.post(f"/api/v1/studies/{uid}/analyze", headers=AUTH)
            assert r.status_code == 202 and dispatcher.process == [r.json()["job_id"]] and r.json()["pulled"] is None
    finally:
        node.close()


def test_analyze_with_invalid_sources_configuration(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url, sources='[{"name": "ARCHIVE", "ae_title": "ORTHANC"}]')
    node = Node.from_settings(settings, migrate=True)
    try:
        seeded = seed(node)
        with TestClient(create_app(node, dispatcher=FakeDispatcher())) as c:
            r = c.post(f"/api/v1/studies/{seeded.study_uids[seeded.done]}/analyze", headers=AUTH,
                       json={"source": "ARCHIVE"})
            assert r.status_code == 500 and r.json()["detail"].startswith("invalid configuration: sources[ARCHIVE]")
    finally:
        node.close()


def test_openapi_publishes_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/api/v1/jobs": {"get"},
        "/api/v1/jobs/{job_id}": {"get"},
        "/api/v1/jobs/{job_id}/retry": {"post"},
        "/api/v1/studies": {"get"},
        "/api/v1/studies/{study_uid}/analyze": {"post"},
        "/healthz": {"get"},
        "/metrics": {"get"},
        "/jobs/{job_id}/keyimages": {"get"},
        "/jobs/{job_id}/keyimages/{n}.png": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), path
    assert "202" in paths["/api/v1/jobs/{job_id}/retry"]["post"]["responses"]
    assert {"JobSummary", "JobDetail", "OutputOut", "DeliveryAttemptOut"} <= set(spec["components"]["schemas"])
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyCookie"] == {"type": "apiKey", "in": "cookie", "name": "pacs_node_session",
                                       "description": schemes["APIKeyCookie"]["description"]}
    # Every patient-data route declares the bearer scheme.
    for path in ("/api/v1/jobs", "/api/v1/studies", "/dicomweb/studies", "/jobs/{job_id}/keyimages"):
        for op in paths[path].values():
            assert {"HTTPBearer": []} in op["security"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert any(p.startswith("/dicomweb/studies") for p in paths)
