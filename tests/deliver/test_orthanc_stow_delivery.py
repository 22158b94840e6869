"""Delivery to Orthanc over C-STORE and STOW-RS, and STOW-RS refusals from a
scripted HTTP endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from peers import JobWithOutputs, OrthancServer
from pacs_node.db.models import DeliveryAttempt
from worker.deliver.service import deliver_job
from worker.deliver.settings import load_destinations


def attempts(job: JobWithOutputs) -> list[DeliveryAttempt]:
    with job.db.session() as s:
        return list(s.execute(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job.job_id)
                              .order_by(DeliveryAttempt.id)).scalars())


@pytest.mark.orthanc
def test_orthanc_dimse_and_stowrs(job: JobWithOutputs, orthanc: OrthancServer) -> None:
    dests = load_destinations([orthanc.destination("dimse"), orthanc.destination("stowrs")], "PACSNODE")
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert report.ok and job.state() == "done", report
    rows = attempts(job)
    assert [(r.destination, r.status, r.status_code) for r in rows] == [
        ("orthanc-dimse", "success", 0), ("orthanc-stow", "success", 200)]
    assert orthanc.instance_count() == len(job.sop_uids)
    for w in job.written:
        oid = orthanc.find_instance(w.sop_instance_uid)
        assert oid is not None, w.kind
        tags = orthanc.tags(oid)
        assert tags["SOPClassUID"] == w.sop_class_uid and tags["SeriesInstanceUID"] == w.series_instance_uid
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in orthanc.series())
    assert modalities == ["SEG", "SEG", "SR"]  # binary SEG, fractional map, SR

    # a second delivery of the same job (resend of a done job) does not duplicate anything
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert report.ok and job.state() == "done"
    assert orthanc.instance_count() == len(job.sop_uids)
    assert len(orthanc.series()) == 3
    assert [r.attempt for r in attempts(job)] == [1, 1, 2, 2]


@pytest.mark.orthanc
def test_orthanc_stowrs_content_round_trip(job: JobWithOutputs, orthanc: OrthancServer) -> None:
    """What Orthanc stored over STOW-RS is byte-for-byte the validated file's data set."""
    dests = load_destinations([orthanc.destination("stowrs", token="secret-token")], "PACSNODE")
    assert deliver_job(job.db, job.job_id, dests, job.outputs_dir).ok
    seg = next(w for w in job.written if w.kind == "seg")
    oid = orthanc.find_instance(seg.sop_instance_uid)
    import httpx

    raw = httpx.get(f"{orthanc.url}/instances/{oid}/file", timeout=30).content
    from io import BytesIO

    got = pydicom.dcmread(BytesIO(raw))
    want = pydicom.dcmread(seg.path)
    assert got.PixelData == want.PixelData and got.SegmentSequence == want.SegmentSequence


class _Script(BaseHTTPRequestHandler):
    """Answers POST /dicom-web/studies with the next scripted (status, body) and records requests."""

    server: Any

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.server.requests.append((self.path, dict(self.headers), body))
        status, payload = self.server.script.pop(0) if self.server.script else (200, {})
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stow_endpoint() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Script)
    server.script = []  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def _failed(uids: list[str], reason: int) -> dict[str, Any]:
    return {"00081198": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": ["1.2"]}, "00081155": {"vr": "UI", "Value": [u]},
         "00081197": {"vr": "US", "Value": [reason]}} for u in uids]}}


def _dest(server: ThreadingHTTPServer, **extra: Any) -> list[Any]:
    table = {"name": "stow", "kind": "stowrs", "url": f"http://127.0.0.1:{server.server_address[1]}/dicom-web",
             "timeout": 5, "backoff_seconds": 1, "headers": {"X-Site": "test"}, "token": "tok"}
    table.update(extra)
    return load_destinations([table])


def test_stow_409_refused(job: JobWithOutputs, stow_endpoint: ThreadingHTTPServer) -> None:
    uids = [w.sop_instance_uid for w in job.written]
    stow_endpoint.script.append((409, _failed(uids, 0xC000)))  # type: ignore[attr-defined]
    report = deliver_job(job.db, job.job_id, _dest(stow_endpoint), job.outputs_dir,
                         sleep=lambda s: pytest.fail("409 is permanent"))
    assert not report.ok and job.state() == "delivery_failed"
    rows = attempts(job)
    assert [(r.status, r.status_code) for r in rows] == [("refused", 409)]  # the HTTP code; per instance the Failure Reason
    assert {i["sop_instance_uid"]: (i["status"], i["status_code"]) for i in rows[0].details["instances"]} == {
        u: ("refused", 0xC000) for u in uids}
    # the request: multipart/related with one application/dicom part per output, auth + custom headers
    path, headers, body = stow_endpoint.requests[0]  # type: ignore[attr-defined]
    assert path == "/dicom-web/studies"
    ctype = headers["Content-Type"]
    assert ctype.startswith("multipart/related") and 'type="application/dicom"' in ctype
    assert headers["Authorization"] == "Bearer tok" and headers["X-Site"] == "test"
    assert body.count(b"Content-Type: application/dicom\r\n") == len(uids)


def test_stow_partial_202(job: JobWithOutputs, stow_endpoint: ThreadingHTTPServer) -> None:
    sr = next(w.sop_instance_uid for w in job.written if w.kind == "sr")
    ok = [w.sop_instance_uid for w in job.written if w.kind != "sr"]
    payload = _failed([sr], 0xA900)
    payload["00081199"] = {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in ok]}
    stow_endpoint.script.append((202, payload))  # type: ignore[attr-defined]
    deliver_job(job.db, job.job_id, _dest(stow_endpoint), job.outputs_dir, sleep=lambda s: pytest.fail("permanent"))
    assert job.state() == "delivery_failed"
    (row,) = attempts(job)
    assert row.status == "partial" and row.status_code == 202
    per = {i["sop_instance_uid"]: (i["status"], i["status_code"]) for i in row.details["instances"]}
    assert per[sr] == ("refused", 0xA900) and all(per[u] == ("success", 202) for u in ok)


def test_stow_503_then_200(job: JobWithOutputs, stow_endpoint: ThreadingHTTPServer) -> None:
    stow_endpoint.script.extend([(503, None), (429, None), (200, {})])  # type: ignore[attr-defined]
    sleeps: list[float] = []
    report = deliver_job(job.db, job.job_id, _dest(stow_endpoint), job.outputs_dir, sleep=sleeps.append)
    assert report.ok and job.state() == "done"
    assert sleeps == [1.0, 2.0]
    assert [(r.status, r.status_code) for r in attempts(job)] == [("error", 503), ("error", 429), ("success", 200)]


def test_stow_401_is_permanent(job: JobWithOutputs, stow_endpoint: ThreadingHTTPServer) -> None:
    stow_endpoint.script.append((401, None))  # type: ignore[attr-defined]
    deliver_job(job.db, job.job_id, _dest(stow_endpoint), job.outputs_dir, sleep=lambda s: pytest.fail("permanent"))
    assert job.state() == "delivery_failed"
    assert [(r.status, r.status_code) for r in attempts(job)] == [("refused", 401)]
