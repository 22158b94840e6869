"""Job leases, the supervisor (outbox + lost workers), retry and analyze."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select

from dicom_factory import make_study, to_bytes
from pacs_node.assemble.scheduler import StudyAssembler
from pacs_node.config import StudySettings
from pacs_node.db.models import Job, JobEvent, utcnow
from pacs_node.ingest.recorder import parse_meta
from pacs_node.jobs import lease
from pacs_node.jobs.actions import JobBusyError, StudyNotFoundError, analyze_study, enqueue, retry_job
from pacs_node.jobs.routing import RoutingRule
from pacs_node.jobs.states import IllegalTransition, JobState, transition
from pacs_node.jobs.supervisor import JobSupervisor
from pacs_node.node import Node


class FakeDispatcher:
    def __init__(self) -> None:
        self.process: list[int] = []
        self.deliver: list[int] = []
        self.down = False

    def enqueue_process(self, job_id: int) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.process.append(job_id)

    def enqueue_delivery(self, job_id: int) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.deliver.append(job_id)


def _job(node: Node, dispatcher: FakeDispatcher, **study_kw) -> int:  # type: ignore[no-untyped-def]
    for ds in make_study(1, 4, **study_kw):
        data = to_bytes(ds)
        node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet="T")
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=1),
                         on_job_created=lambda j: enqueue(node.db, dispatcher, j) and None,
                         clock=lambda: utcnow() + dt.timedelta(seconds=5))
    (job_id,) = asm.tick()
    return job_id


def _state(node: Node, job_id: int) -> str:
    with node.db.sessionmaker() as s:
        return s.get(Job, job_id).state  # type: ignore[union-attr]


def test_created_job_is_enqueued_after_commit(node: Node) -> None:
    d = FakeDispatcher()
    job_id = _job(node, d)
    assert d.process == [job_id]
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.enqueued_at is not None and job.source_series_uid


def test_broker_down_then_supervisor_enqueues(node: Node) -> None:
    d = FakeDispatcher()
    d.down = True
    job_id = _job(node, d)
    assert d.process == [] and _state(node, job_id) == "queued"
    sup = JobSupervisor(node.db, d, resend_after_seconds=0)
    assert sup.tick()["enqueued"] == []  # still down
    d.down = False
    assert sup.tick()["enqueued"] == [job_id]
    assert sup.tick()["enqueued"] == []  # once


def test_claim_is_exclusive_across_threads(node: Node) -> None:
    d = FakeDispatcher()
    job_id = _job(node, d)
    wins: list[str] = []
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        barrier.wait()
        if lease.claim(node.db, job_id, from_state=JobState.QUEUED, to_state=JobState.RUNNING,
                       host=name, lease_seconds=60, message="started"):
            wins.append(name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == "running" and job.attempts == 1 and job.worker_host == wins[0]


def test_lost_worker_is_recovered_by_lease(node: Node) -> None:
    d = FakeDispatcher()
    job_id = _job(node, d)
    assert lease.claim(node.db, job_id, from_state=JobState.QUEUED, to_state=JobState.RUNNING,
                       host="dead-host", lease_seconds=30, message="started")
    # A second worker cannot take it while the lease holds.
    assert not lease.claim(node.db, job_id, from_state=JobState.QUEUED, to_state=JobState.RUNNING,
                           host="other", lease_seconds=30, message="started")
    now = utcnow()
    sup = JobSupervisor(node.db, d, resend_after_seconds=0, clock=lambda: now)
    assert sup.tick()["recovered"] == []
    later = now + dt.timedelta(seconds=31)
    sup = JobSupervisor(node.db, d, resend_after_seconds=0, clock=lambda: later)
    result = sup.tick()
    assert result["recovered"] == [job_id] and result["enqueued"] == [job_id]
    assert _state(node, job_id) == "queued"
    with node.db.sessionmaker() as s:
        msgs = [e.message for e in s.execute(select(JobEvent).where(JobEvent.job_id == job_id)).scalars()]
    assert any("dead-host lost" in (m or "") for m in msgs)
    assert lease.claim(node.db, job_id, from_state=JobState.QUEUED, to_state=JobState.RUNNING,
                       host="w2", lease_seconds=30, message="started")


def test_renew_keeps_the_job(node: Node) -> None:
    d = FakeDispatcher()
    job_id = _job(node, d)
    assert lease.claim(node.db, job_id, from_state=JobState.QUEUED, to_state=JobState.RUNNING,
                       host="w", lease_seconds=1, message="started")
    assert lease.renew(node.db, job_id, state=JobState.RUNNING, lease_seconds=120)
    sup = JobSupervisor(node.db, d, clock=lambda: utcnow() + dt.timedelta(seconds=10))
    assert sup.tick()["recovered"] == []
    assert not lease.renew(node.db, job_id, state=JobState.DELIVERING, lease_seconds=120)


def test_retry_and_analyze(node: Node) -> None:
    d = FakeDispatcher()
    job_id = _job(node, d)
    with pytest.raises(JobBusyError):
        retry_job(node.db, d, job_id)
    with node.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        transition(s, job, JobState.RUNNING, "started")
        transition(s, job, JobState.FAILED, "boom")
        with pytest.raises(IllegalTransition):
            transition(s, job, JobState.DONE, "cannot")
        study_uid = job.study.study_instance_uid
    retry_job(node.db, d, job_id)
    assert _state(node, job_id) == "queued" and d.process.count(job_id) == 2
    new_id = analyze_study(node.db, d, study_uid, [RoutingRule()])
    assert new_id != job_id and d.process[-1] == new_id
    with node.db.sessionmaker() as s:
        new = s.get(Job, new_id)
        assert new is not None and new.study_version == 2 and new.reason == "analysis requested"
    with pytest.raises(StudyNotFoundError):
        analyze_study(node.db, d, "1.2.3.4", [RoutingRule()])


def test_routing_skips_unmatched_studies(node: Node) -> None:
    d = FakeDispatcher()
    for ds in make_study(1, 4, modality="CT"):
        data = to_bytes(ds)
        node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet="T")
    rules = [RoutingRule(name="brain-mr", modality=["MR"], profile="brain")]
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=1), rules=rules,
                         on_job_created=lambda j: enqueue(node.db, d, j) and None,
                         clock=lambda: utcnow() + dt.timedelta(seconds=5))
    (job_id,) = asm.tick()
    with node.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == "skipped"
        assert "brain-mr: no matching series" in (job.events[-1].message or "")
    assert d.process == []
