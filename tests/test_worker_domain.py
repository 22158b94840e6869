"""The training-domain check of the engine (``Prediction.domain``) on the job:
``findings["domain"]``, the WARNING log line, the DELIVERING event, the REST
detail and ``pacs-node jobs show``.

The worker step runs in-process (``worker.pipeline.process``) on a real
ingested study with a fake predictor, so no model is trained here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.api_seed import FakeDispatcher
from dicom_factory import make_study, to_bytes
from nodetest import TEST_AUTH
from pacs_node.api.app import create_app
from pacs_node.assemble.scheduler import StudyAssembler
from pacs_node.cli import data_cmds
from pacs_node.config import Settings, StudySettings
from pacs_node.db.models import Job, utcnow
from pacs_node.ingest.recorder import parse_meta
from pacs_node.jobs.actions import enqueue
from pacs_node.node import Node
from worker.pipeline import WorkerContext, process
from worker.settings import WorkerSettings

OUT_OF_DOMAIN: dict[str, Any] = {
    "in_domain": False,
    "warnings": ["slice spacing 8 mm is outside the training range 1-6 mm",
                 "pixel spacing 0.2 mm is outside the training range 0.5-1.5 mm"],
    "checks": {"slice_spacing_mm": {"value": np.float32(8.0), "range": [1.0, 6.0], "ok": np.bool_(False)},
               "pixel_spacing_mm": {"value": 0.2, "range": [0.5, 1.5], "ok": False}},
}


@dataclass
class FakePrediction:
    mask: np.ndarray
    anomaly_map: np.ndarray
    findings: list[Any] = field(default_factory=list)
    study_score: float = 0.1
    threshold: float = 0.5
    timings: dict[str, float] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)


class FakePredictor:
    """Nothing found; the given training-domain check."""

    model_name = "fake-model"
    model_version = "fake/1.0"
    checksum = "ab" * 32

    def __init__(self, domain: dict[str, Any]) -> None:
        self.domain = domain

    def predict(self, volume: Any) -> FakePrediction:
        shape = np.asarray(volume.array).shape
        return FakePrediction(mask=np.zeros(shape, bool), anomaly_map=np.zeros(shape, np.float32),
                              domain=dict(self.domain))


def _queued_job(node: Node) -> int:
    dispatcher = FakeDispatcher()
    for ds in make_study(1, 4):
        data = to_bytes(ds)
        node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet="T")
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=1),
                         on_job_created=lambda j: enqueue(node.db, dispatcher, j) and None,
                         clock=lambda: utcnow() + dt.timedelta(seconds=5))
    (job_id,) = asm.tick()
    return int(job_id)


def _run(node: Node, settings: Settings, domain: dict[str, Any]) -> tuple[int, FakeDispatcher]:
    job_id = _queued_job(node)
    dispatcher = FakeDispatcher()
    ctx = WorkerContext(settings=settings, worker=WorkerSettings.from_settings(settings), db=node.db,
                        dispatcher=dispatcher)
    predictor = FakePredictor(domain)
    ctx.predictor = lambda profile: predictor  # type: ignore[method-assign]
    assert process(ctx, job_id) == "delivering"
    return job_id, dispatcher


def _show(settings: Settings, job_id: int, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(data_cmds, "load", lambda args, quiet=False: settings)
    assert data_cmds.cmd_jobs_show(argparse.Namespace(job_id=job_id, json=False)) == 0
    return capsys.readouterr().out


def test_out_of_domain_series_is_recorded(node: Node, settings: Settings, caplog: pytest.LogCaptureFixture,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with caplog.at_level(logging.INFO):
        job_id, dispatcher = _run(node, settings, OUT_OF_DOMAIN)
    assert dispatcher.deliver == [job_id]
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == "delivering"
        domain = job.findings["domain"]
        events = [e.message for e in job.events if e.to_state == "delivering"]
    # Stored as plain JSON (numpy scalars converted).
    assert domain == json.loads(json.dumps(domain))
    assert domain["in_domain"] is False and domain["warnings"] == OUT_OF_DOMAIN["warnings"]
    assert domain["checks"]["slice_spacing_mm"] == {"value": 8.0, "range": [1.0, 6.0], "ok": False}
    assert len(events) == 1 and events[0].startswith("0 finding(s), ")
    assert events[0].endswith(f" output(s) built, outside the training domain: {OUT_OF_DOMAIN['warnings'][0]}")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "worker.pipeline"]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert f"job {job_id}:" in line and all(w in line for w in OUT_OF_DOMAIN["warnings"])
    assert "Test^Patient" not in caplog.text and "TEST-001" not in caplog.text

    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=TEST_AUTH) as c:
        r = c.get(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["findings"]["domain"] == domain

    out = _show(settings, job_id, capsys, monkeypatch)
    assert f"domain:              OUTSIDE the training domain: {'; '.join(OUT_OF_DOMAIN['warnings'])}" in out


def test_in_domain_and_unchecked_series(node: Node, settings: Settings, caplog: pytest.LogCaptureFixture,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with caplog.at_level(logging.INFO):
        inside, _ = _run(node, settings, {"in_domain": True, "warnings": [], "checks": {}})
        unchecked, _ = _run(node, settings, {})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "worker.pipeline"]
    with node.db.sessionmaker() as s:
        a, b = s.get(Job, inside), s.get(Job, unchecked)
        assert a is not None and b is not None
        assert a.findings["domain"] == {"in_domain": True, "warnings": [], "checks": {}}
        assert "domain" not in b.findings
        assert all("training domain" not in (e.message or "") for e in [*a.events, *b.events])
    assert "domain:              within the training domain" in _show(settings, inside, capsys, monkeypatch)
    assert "domain:              not checked" in _show(settings, unchecked, capsys, monkeypatch)
