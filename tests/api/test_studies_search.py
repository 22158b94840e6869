"""Search and paging of ``GET /api/v1/studies`` and ``GET /api/v1/jobs``
(patient name / ID, accession number, Study Instance UID, study date, with
``*`` / ``?`` wildcards; ``X-Total-Count``), the patient and study fields of
both lists, and the viewer link of ``http.viewer_url``; on SQLite and
PostgreSQL. The values are bound parameters: SQL's own ``%`` and ``_`` and a
quote are plain characters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from pydicom.uid import generate_uid

from api_seed import AUTH, FakeDispatcher, advance, assemble, gradient_series, ingest
from nodetest import make_settings
from pacs_node.api.app import create_app
from pacs_node.config import HttpSettings
from pacs_node.jobs.states import JobState
from pacs_node.node import Node

#: (patient name, patient ID, accession, study date, description)
PATIENTS = [
    ("Smith^John", "P-100", "ACC-001", "20250105", "MRI Head"),
    ("Smithers^Anna", "P-101", "ACC-002", "20250210", "CT Chest"),
    ("Jones^Mary", "X_7", "B%9", "20241231", "MRI Knee"),
    ("O'Brien^Liam", "P-300", "ACC-010", "20250301", "MRI Head"),
]


def seed_patients(node: Node) -> dict[str, str]:
    """One study per row of :data:`PATIENTS` (a job each); patient ID -> Study UID."""
    uids: dict[str, str] = {}
    for name, pid, accession, date, description in PATIENTS:
        uid = "1.2.826.0.1.3680043.10.54321." + str(len(uids) + 1)
        series = gradient_series(4, 16, 16, study_uid=uid)
        for ds in series:
            ds.PatientName, ds.PatientID, ds.AccessionNumber = name, pid, accession
            ds.StudyDate, ds.StudyDescription = date, description
        ingest(node, series)
        uids[pid] = uid
    assert len(assemble(node)) == len(PATIENTS)
    return uids


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["patient_id"] for r in rows]


def test_study_search_wildcards_dates_and_paging(node: Node) -> None:
    uids = seed_patients(node)
    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        def find(**params: Any) -> list[str]:
            r = c.get("/api/v1/studies", params=params)
            assert r.status_code == 200, r.text
            assert int(r.headers["x-total-count"]) >= len(r.json())
            return ids(r.json())

        everything = c.get("/api/v1/studies")
        assert everything.headers["x-total-count"] == "4"
        assert ids(everything.json()) == ["P-300", "X_7", "P-101", "P-100"]  # newest first
        first = everything.json()[-1]
        assert (first["patient_name"], first["accession_number"], first["study_date"], first["study_description"]) \
            == ("Smith^John", "ACC-001", "20250105", "MRI Head")
        assert first["modalities"] == ["CT"] and first["latest_job_state"] == "queued" and first["latest_job_id"]
        assert first["viewer_url"] is None

        # patient: name or ID, case-insensitive, a prefix without wildcards
        assert find(patient="smith") == ["P-101", "P-100"]
        assert find(patient="SMITH^J*") == ["P-100"]
        assert find(patient="*mary") == ["X_7"]
        assert find(patient="Smith?rs*") == ["P-101"]
        assert find(patient="p-10") == ["P-101", "P-100"]
        assert find(patient="o'brien") == ["P-300"]  # a quote is a character, not SQL
        assert find(patient="X_") == ["X_7"] and find(patient="P_1") == []  # _ is literal
        assert find(patient="%") == []  # so is %
        # accession and Study UID: exact unless wildcards
        assert find(accession="ACC-001") == ["P-100"]
        assert find(accession="ACC-00") == []
        assert find(accession="ACC-00?") == ["P-101", "P-100"]
        assert find(accession="B%9") == ["X_7"] and find(accession="B%") == []
        assert find(study_uid=uids["P-101"]) == ["P-101"]
        assert find(study_uid="1.2.826.0.1.3680043.10.54321.*") == ["P-300", "X_7", "P-101", "P-100"]
        # dates and ranges (both ends included)
        assert find(date="20250105") == ["P-100"]
        assert find(date="2025-01-05") == ["P-100"]
        assert find(date="20250101-20250228") == ["P-101", "P-100"]
        assert find(date="20250210-") == ["P-300", "P-101"]
        assert find(date="-20241231") == ["X_7"]
        # criteria combine with AND
        assert find(patient="smith", date="20250201-") == ["P-101"]
        assert find(patient="smith", accession="ACC-010") == []
        for bad in ("2025", "20250105-2025", "-", "yesterday"):
            r = c.get("/api/v1/studies", params={"date": bad})
            assert r.status_code == 422, (bad, r.text)
        assert c.get("/api/v1/studies", params={"patient": "x" * 129}).status_code == 422

        # paging: limit / offset and the total for next / previous
        pages = []
        for offset in (0, 3):
            r = c.get("/api/v1/studies", params={"limit": 3, "offset": offset})
            assert r.headers["x-total-count"] == "4"
            pages.append(ids(r.json()))
        assert pages == [["P-300", "X_7", "P-101"], ["P-100"]]
        r = c.get("/api/v1/studies", params={"patient": "p-", "limit": 1, "offset": 1})
        assert r.headers["x-total-count"] == "3" and ids(r.json()) == ["P-101"]

        # the study list needs the read scope (patient data)
        assert c.get("/api/v1/studies", headers={"Authorization": ""}).status_code == 401


def test_job_list_patient_fields_filters_and_stage(node: Node) -> None:
    uids = seed_patients(node)
    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        jobs = {j["patient_id"]: j for j in c.get("/api/v1/jobs").json()}
        john = jobs["P-100"]
        assert (john["patient_name"], john["study_date"], john["study_description"], john["accession_number"]) \
            == ("Smith^John", "20250105", "MRI Head", "ACC-001")
        assert john["stage"] == "queue_wait" and john["viewer_url"] is None
        advance(node, john["id"], JobState.RUNNING, stage="inference")
        r = c.get("/api/v1/jobs", params={"patient": "smith"})
        assert r.headers["x-total-count"] == "2" and ids(r.json()) == ["P-101", "P-100"]
        assert r.json()[1]["stage"] == "inference" and r.json()[1]["state"] == "running"
        assert ids(c.get("/api/v1/jobs", params={"patient": "smith", "state": "running"}).json()) == ["P-100"]
        assert ids(c.get("/api/v1/jobs", params={"accession": "ACC-0*", "date": "20250201-"}).json()) \
            == ["P-300", "P-101"]
        assert ids(c.get("/api/v1/jobs", params={"study_uid": uids["X_7"]}).json()) == ["X_7"]
        r = c.get("/api/v1/jobs", params={"limit": 1, "offset": 1})
        assert r.headers["x-total-count"] == "4" and len(r.json()) == 1
        assert c.get("/api/v1/jobs", params={"date": "2025-13"}).status_code == 422
        detail = c.get(f"/api/v1/jobs/{john['id']}").json()
        assert detail["patient_name"] == "Smith^John" and detail["stage"] == "inference"


def test_viewer_link_from_the_url_template(tmp_path: Path, db_url: str) -> None:
    template = "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}&x=1"
    node = Node.from_settings(make_settings(tmp_path, db_url, http__viewer_url=template), migrate=True)
    try:
        odd = "1.2.3&next=<x>"  # not a valid UID; the link must still carry it encoded
        uid = generate_uid()
        ingest(node, gradient_series(4, 16, 16, study_uid=uid))
        assemble(node)
        with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
            (job,) = c.get("/api/v1/jobs").json()
            expected = f"https://ohif.example.org/viewer?StudyInstanceUIDs={uid}&x=1"
            assert job["viewer_url"] == expected
            assert c.get(f"/api/v1/jobs/{job['id']}").json()["viewer_url"] == expected
            assert c.get("/api/v1/studies").json()[0]["viewer_url"] == expected
    finally:
        node.close()
    from pacs_node.api.jobs import viewer_link

    assert viewer_link(template, odd) == \
        "https://ohif.example.org/viewer?StudyInstanceUIDs=1.2.3%26next%3D%3Cx%3E&x=1"
    assert viewer_link(None, uid) is None
    for bad in ("javascript:alert(1)//{study_uid}", "https://viewer.example.org/"):
        with pytest.raises(ValidationError):
            HttpSettings(viewer_url=bad)
