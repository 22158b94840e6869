"""Study assembly: quiet period, required series, force-complete, re-analysis
versions, and exactly-once job creation under concurrent schedulers."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_factory import make_instance, make_study, to_bytes
from pacs_node.assemble.scheduler import StudyAssembler
from pacs_node.config import StudySettings
from pacs_node.db.models import Job, JobEvent, Study, utcnow
from pacs_node.ingest.recorder import parse_meta
from pacs_node.node import Node


class FakeClock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def sync(self) -> None:
        """Catch up with the real clock the recorder stamps arrivals with."""
        self.now = utcnow()

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _ingest(node: Node, datasets) -> None:  # type: ignore[no-untyped-def]
    for ds in datasets:
        data = to_bytes(ds)
        node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet="TEST")


def _jobs(node: Node) -> list[Job]:
    with node.db.sessionmaker() as s:
        return list(s.execute(select(Job).order_by(Job.id)).scalars())


def test_job_created_once_after_quiet_period(node: Node) -> None:
    clock = FakeClock()
    created: list[int] = []
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=10), on_job_created=created.append, clock=clock)
    _ingest(node, make_study(3, 4))
    clock.sync()
    assert asm.tick() == []  # just received: not stable yet
    clock.advance(9.5)
    assert asm.tick() == []
    clock.advance(1.0)
    ids = asm.tick()
    assert len(ids) == 1 and created == ids
    assert asm.tick() == []  # never twice
    (job,) = _jobs(node)
    assert job.state == "queued" and job.instance_count == 12 and job.series_count == 3
    assert job.study_version == 1 and "stable" in (job.reason or "")
    with node.db.sessionmaker() as s:
        events = list(s.execute(select(JobEvent).where(JobEvent.job_id == job.id)).scalars())
    assert [(e.from_state, e.to_state) for e in events] == [(None, "received"), ("received", "queued")]


def test_late_instances_make_a_new_version(node: Node) -> None:
    clock = FakeClock()
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=5), clock=clock)
    study = make_study(1, 3)
    _ingest(node, study)
    clock.sync()
    clock.advance(6)
    assert len(asm.tick()) == 1
    # A late instance of the same study: a re-analysis, not a silent merge.
    late = make_instance(study_uid=study[0].StudyInstanceUID, series_uid=study[0].SeriesInstanceUID, instance_number=9)
    _ingest(node, [late])
    # A resend of an identical instance does not start a new version.
    _ingest(node, [study[0]])
    clock.sync()
    clock.advance(6)
    assert len(asm.tick()) == 1
    jobs = _jobs(node)
    assert [(j.study_version, j.instance_count) for j in jobs] == [(1, 3), (2, 4)]
    with node.db.sessionmaker() as s:
        st = s.execute(select(Study)).scalar_one()
    assert (st.version, st.job_version) == (2, 2)


def test_required_series_rule_completes_early(node: Node) -> None:
    clock = FakeClock()
    settings = StudySettings(stable_seconds=60, required_series=["^T1", "FLAIR"], required_series_quiet_seconds=1)
    asm = StudyAssembler(node.db, settings, clock=clock)
    study_uid = generate_uid()
    t1 = make_instance(study_uid=study_uid, series_uid=generate_uid(), modality="MR", series_description="T1 MPRAGE")
    _ingest(node, [t1])
    clock.sync()
    clock.advance(2)
    assert asm.tick() == []  # FLAIR still missing
    flair = make_instance(study_uid=study_uid, series_uid=generate_uid(), modality="MR", series_description="AX FLAIR")
    _ingest(node, [flair])
    clock.sync()
    clock.advance(0.5)
    assert asm.tick() == []  # present but not quiet yet
    clock.advance(1)
    assert len(asm.tick()) == 1
    assert "required series" in (_jobs(node)[0].reason or "")


def test_force_complete_for_a_trickling_study(node: Node) -> None:
    clock = FakeClock()
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=10, force_complete_seconds=30), clock=clock)
    study_uid, series_uid = generate_uid(), generate_uid()
    for i in range(8):
        _ingest(node, [make_instance(study_uid=study_uid, series_uid=series_uid, instance_number=i + 1)])
        clock.advance(5)
        # Timestamps come from the real clock in the recorder; keep the fake
        # clock's notion of "quiet" below stable_seconds by moving it with them.
        with node.db.session() as s:
            st = s.execute(select(Study)).scalar_one()
            st.last_received_at = clock.now
            if i == 0:
                st.version_started_at = clock.now
        created = asm.tick()
        if created:
            break
    assert created, "study never forced complete"
    assert "forced" in (_jobs(node)[0].reason or "")


def test_two_schedulers_never_create_the_same_job(node: Node) -> None:
    clock = FakeClock()
    for _ in range(5):
        _ingest(node, make_study(1, 2))
    clock.advance(20)
    results: list[list[int]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        asm = StudyAssembler(node.db, StudySettings(stable_seconds=10), clock=clock)
        barrier.wait()
        results.append(asm.tick())

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for r in results for i in r]
    assert len(all_ids) == 5 and len(set(all_ids)) == 5
    assert len(_jobs(node)) == 5


def test_loop_wakes_when_the_earliest_study_becomes_due(node: Node) -> None:
    clock = FakeClock()
    settings = StudySettings(stable_seconds=3, scheduler_interval_seconds=1.0, force_complete_seconds=600)
    asm = StudyAssembler(node.db, settings, clock=clock)
    assert asm.wait_seconds() == 1.0  # nothing waits: the interval
    _ingest(node, make_study(1, 2))
    clock.sync()
    assert asm.tick() == []
    with node.db.sessionmaker() as s:
        (last,) = s.execute(select(Study.last_received_at)).scalars()
    assert asm.next_due_at == last + dt.timedelta(seconds=3)
    assert asm.wait_seconds() == 1.0  # due in ~3 s: capped at the interval
    clock.now = last + dt.timedelta(seconds=2.75)
    assert abs(asm.wait_seconds() - 0.25) < 1e-6  # wakes when the study becomes due
    clock.now = last + dt.timedelta(seconds=3)
    assert asm.wait_seconds() == 0.01  # due now: at once (10 ms floor)
    assert len(asm.tick()) == 1
    assert asm.next_due_at is None and asm.wait_seconds() == 1.0


def test_serve_claims_a_study_about_stable_seconds_after_its_last_instance(tmp_path: Path, sqlite_url: str) -> None:
    """Interval 5 s, stable 2 s: the loop's first tick sees the study waiting and
    wakes again when it becomes due (~2 s), not at the next interval (5 s)."""
    import time

    from nodetest import make_settings
    from pacs_node.serve import NodeServer

    class Recorder:
        def enqueue_process(self, job_id: int) -> None:
            pass

        def enqueue_delivery(self, job_id: int) -> None:
            pass

    settings = make_settings(tmp_path, sqlite_url, study__stable_seconds="2.0",
                             study__scheduler_interval_seconds="5.0", study__force_complete_seconds="600")
    node = Node.from_settings(settings, migrate=True)
    _ingest(node, make_study(1, 2))
    t0 = time.monotonic()
    server = NodeServer(node, dispatcher=Recorder())
    server.start_background()
    try:
        while not _jobs(node) and time.monotonic() - t0 < 12:
            time.sleep(0.05)
        waited = time.monotonic() - t0
    finally:
        server.stop()
        node.close()
    assert _jobs(node), "no job created"
    assert 1.9 <= waited < 4.0, f"job created {waited:.2f} s after the last instance (stable 2 s, interval 5 s)"
