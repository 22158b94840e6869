"""The worker records the stage a job is in when the stage starts; a job that
fails keeps its timings, its findings so far, the stage it failed in and its
error, and the REST API shows them (SQLite and PostgreSQL).

The worker step runs in-process (``worker.pipeline.process``) on a real
ingested study with a small fake predictor (as in ``test_worker_domain``), so
no model is trained here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from api_seed import AUTH, FakeDispatcher, assemble, gradient_series, ingest
from pacs_node.api.app import create_app
from pacs_node.config import Settings
from pacs_node.db.models import Job
from pacs_node.node import Node
from worker.pipeline import WorkerContext, process
from worker.settings import WorkerSettings


@dataclass
class Finding:
    label: int = 1
    volume_mm3: float = 42.0
    centroid_patient: tuple[float, float, float] = (1.0, 2.0, 3.0)
    bbox_zyx: tuple[int, ...] = (0, 0, 0, 1, 2, 2)
    max_score: float = 0.9
    mean_score: float = 0.7
    voxel_count: int = 4


@dataclass
class Prediction:
    mask: np.ndarray
    anomaly_map: np.ndarray
    findings: list[Any] = field(default_factory=lambda: [Finding()])
    study_score: float = 0.9
    threshold: float = 0.5
    timings: dict[str, float] = field(default_factory=lambda: {"inference": 0.25, "postprocess": 0.05})
    domain: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """Looks at the job's recorded stage while it predicts; its mask has the
    wrong shape, so building the SEG fails afterwards."""

    model_name = "fake-model"
    model_version = "fake/1.0"
    checksum = "cd" * 32

    def __init__(self, node: Node, client: TestClient, job_id: int) -> None:
        self.node, self.client, self.job_id = node, client, job_id
        self.seen: dict[str, Any] = {}

    def predict(self, volume: Any) -> Prediction:
        with self.node.db.sessionmaker() as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            self.seen["db"] = (job.state, job.stage, job.stage_started_at is not None, dict(job.timings))
        self.seen["api"] = self.client.get(f"/api/v1/jobs/{self.job_id}").json()
        self.seen["list"] = self.client.get("/api/v1/jobs", params={"state": "running"}).json()
        wrong = np.zeros((1, 2, 2), bool)
        return Prediction(mask=wrong, anomaly_map=wrong.astype(np.float32))


def test_running_stage_and_failure_keep_timings_findings_and_error(node: Node, settings: Settings) -> None:
    ingest(node, gradient_series(4, 16, 16))
    (job_id,) = assemble(node)
    ctx = WorkerContext(settings=settings, worker=WorkerSettings.from_settings(settings), db=node.db,
                        dispatcher=FakeDispatcher())
    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=AUTH) as c:
        queued = c.get(f"/api/v1/jobs/{job_id}").json()
        assert queued["state"] == "queued" and queued["stage"] == "queue_wait"
        predictor = Predictor(node, c, job_id)
        ctx.predictor = lambda profile: predictor  # type: ignore[method-assign]
        assert process(ctx, job_id) == "failed"

        # While the model ran, the job was in the inference stage, with the load timing recorded.
        state, stage, started, timings = predictor.seen["db"]
        assert (state, stage, started) == ("running", "inference", True)
        assert set(timings) == {"queue_wait", "load"}
        api = predictor.seen["api"]
        assert api["state"] == "running" and api["stage"] == "inference" and api["stage_started_at"]
        assert [(j["id"], j["stage"]) for j in predictor.seen["list"]] == [(job_id, "inference")]

        # Building the outputs failed: the job keeps what it had.
        failed = c.get(f"/api/v1/jobs/{job_id}").json()
        assert failed["state"] == "failed" and failed["stage"] == "build"
        assert failed["error"].startswith("outputs cannot be built from the source series: mask has shape")
        assert {"queue_wait", "load", "inference", "postprocess", "build"} <= set(failed["timings"])
        assert failed["timings"]["inference"] == 0.25 and failed["timings"]["postprocess"] == 0.05
        assert failed["findings_count"] == 1 and failed["findings"]["items"][0]["volume_mm3"] == 42.0
        assert failed["study_score"] == 0.9
        assert [e["to_state"] for e in failed["events"]][-2:] == ["running", "failed"]
        assert failed["stage_started_at"] is None  # only while it works
