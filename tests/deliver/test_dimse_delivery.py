"""C-STORE delivery to dcmtk storescp and to pynetdicom SCPs that refuse."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from peers import JobWithOutputs, StoreSCP  # noqa: F401 - tests/deliver/conftest.py
from nodetest import free_port
from pacs_node.db.models import DeliveryAttempt, JobEvent
from worker.deliver.service import DeliveryError, deliver_job
from worker.deliver.settings import load_destinations

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def attempts(job: JobWithOutputs) -> list[DeliveryAttempt]:
    with job.db.session() as s:
        return list(s.execute(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job.job_id)
                              .order_by(DeliveryAttempt.id)).scalars())


def events(job: JobWithOutputs) -> list[tuple[str | None, str]]:
    with job.db.session() as s:
        return [(e.from_state, e.to_state) for e in s.execute(
            select(JobEvent).where(JobEvent.job_id == job.job_id).order_by(JobEvent.id)).scalars()]


def test_deliver_to_storescp(job: JobWithOutputs, storescp: Callable[..., StoreSCP]) -> None:
    scp = storescp()
    dests = load_destinations([scp.destination()], "PACSNODE")
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry expected"))
    assert report.ok and str(report) == "done" and job.state() == "done"
    received = scp.received()
    assert {ds.SOPInstanceUID for ds in received} == job.sop_uids
    assert {ds.Modality for ds in received} == {"SEG", "SR"}
    rows = attempts(job)
    assert [(r.destination, r.attempt, r.status, r.status_code) for r in rows] == [("storescp", 1, "success", 0)]
    assert {i["sop_instance_uid"] for i in rows[0].details["instances"]} == job.sop_uids
    assert all(i["status"] == "success" and i["status_code"] == 0 for i in rows[0].details["instances"])
    assert rows[0].finished_at is not None and rows[0].finished_at >= rows[0].started_at
    assert events(job)[-2:] == [("running", "delivering"), ("delivering", "done")]


def test_dimse_deliverer_sets_nodelay_and_proposes_only_needed_contexts(
    job: JobWithOutputs, pyscp: Callable[..., PyScp]
) -> None:
    from worker.deliver.base import DeliveryItem
    from worker.deliver.dimse import DimseDeliverer

    proposed: list[tuple[str, list[str]]] = []
    scp = pyscp(lambda e: 0)
    scp.server.bind(evt.EVT_REQUESTED, lambda e: proposed.extend(
        (str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax]) for cx in e.assoc.requestor.requested_contexts))
    (dest,) = load_destinations([{"name": "p", "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
                                  "ae_title": "REFUSER"}], "CALLER")
    d = DimseDeliverer(dest)
    items = [DeliveryItem(w.path, w.sop_class_uid, w.sop_instance_uid, w.kind) for w in job.written]
    assert d.send(items).ok and d.nodelay
    assert sorted(p[0] for p in proposed) == sorted({w.sop_class_uid for w in job.written})
    assert all(ts == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"] for _, ts in proposed)


def test_destination_down_then_up(job: JobWithOutputs, storescp: Callable[..., StoreSCP]) -> None:
    port = free_port()  # nothing listens yet: connection refused
    dests = load_destinations([{"name": "late", "kind": "dimse", "host": "127.0.0.1", "port": port,
                                "ae_title": "STORESCP", "backoff_seconds": 1, "max_backoff_seconds": 10,
                                "max_attempts": 5, "timeout": 5}], "PACSNODE")
    sleeps: list[float] = []
    scps: list[StoreSCP] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # comes up after the second failure
            scps.append(storescp(port=port))

    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=sleep)
    assert report.ok and job.state() == "done"
    assert sleeps == [1.0, 2.0]  # exponential backoff
    rows = attempts(job)
    assert [(r.attempt, r.status) for r in rows] == [(1, "error"), (2, "error"), (3, "success")]
    assert "cannot connect" in (rows[0].error or "")
    assert {ds.SOPInstanceUID for ds in scps[0].received()} == job.sop_uids


def test_destination_stays_down_then_resend(job: JobWithOutputs, storescp: Callable[..., StoreSCP]) -> None:
    port = free_port()
    table = {"name": "down", "kind": "dimse", "host": "127.0.0.1", "port": port, "ae_title": "STORESCP",
             "backoff_seconds": 2, "max_backoff_seconds": 3, "max_attempts": 3, "timeout": 5}
    sleeps: list[float] = []
    report = deliver_job(job.db, job.job_id, load_destinations([table], "PACSNODE"), job.outputs_dir,
                         sleep=sleeps.append)
    assert not report.ok and job.state() == "delivery_failed"
    assert sleeps == [2.0, 3.0]  # capped at max_backoff_seconds
    assert [(r.attempt, r.status) for r in attempts(job)] == [(1, "error"), (2, "error"), (3, "error")]
    with job.db.session() as s:
        from pacs_node.db.models import Job

        j = s.get(Job, job.job_id)
        assert j is not None and "down" in (j.error or "") and "cannot connect" in (j.error or "")

    # later: the destination is up, the job is resent (delivery_failed -> delivering -> done)
    scp = storescp(port=port)
    report = deliver_job(job.db, job.job_id, load_destinations([table], "PACSNODE"), job.outputs_dir,
                         sleep=sleeps.append)
    assert report.ok and job.state() == "done"
    assert [(r.attempt, r.status) for r in attempts(job)][-1] == (4, "success")
    assert {ds.SOPInstanceUID for ds in scp.received()} == job.sop_uids


class PyScp:
    """A pynetdicom Storage SCP whose answer per SOP Class is scripted."""

    def __init__(self, answers: Callable[[Any], int], ae_title: str = "REFUSER", require_called_aet: bool = False,
                 contexts: list[Any] | None = None) -> None:
        self.port = free_port()
        self.received: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.supported_contexts = contexts if contexts is not None else AllStoragePresentationContexts

        def on_store(event: Any) -> int:
            status = answers(event)
            with self.lock:
                self.received.append((str(event.request.AffectedSOPInstanceUID), status))
            return status

        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pyscp() -> Iterator[Callable[..., PyScp]]:
    servers: list[PyScp] = []

    def make(*args: Any, **kwargs: Any) -> PyScp:
        servers.append(PyScp(*args, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def test_refused_seg_fails_delivery(job: JobWithOutputs, pyscp: Callable[..., PyScp]) -> None:
    scp = pyscp(lambda e: 0xA900 if e.request.AffectedSOPClassUID == SEG else 0x0000)
    dests = load_destinations([{"name": "refuser", "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
                                "ae_title": "REFUSER", "backoff_seconds": 0}], "PACSNODE")
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("permanent: no retry"))
    assert not report.ok and job.state() == "delivery_failed"
    rows = attempts(job)
    assert len(rows) == 1 and rows[0].status == "partial" and rows[0].status_code == 0xA900
    per = {i["sop_instance_uid"]: i for i in rows[0].details["instances"]}
    segs = {w.sop_instance_uid for w in job.written if w.sop_class_uid == SEG}  # SEG + FRACTIONAL map
    assert len(segs) == 2
    assert all(per[u]["status"] == "refused" and per[u]["status_code"] == 0xA900 for u in segs)
    assert all(v["status"] == "success" and v["status_code"] == 0 for k, v in per.items() if k not in segs)
    assert report.destinations[0].status == "partial" and "0xa900" in (report.destinations[0].error or "")


def test_out_of_resources_is_retried_for_that_instance_only(job: JobWithOutputs, pyscp: Callable[..., PyScp]) -> None:
    calls: dict[str, int] = {}
    seg_uid = next(w.sop_instance_uid for w in job.written if w.kind == "seg")

    def answer(e: Any) -> int:
        uid = str(e.request.AffectedSOPInstanceUID)
        calls[uid] = calls.get(uid, 0) + 1
        return 0xA700 if uid == seg_uid and calls[uid] == 1 else 0x0000

    scp = pyscp(answer)
    dests = load_destinations([{"name": "busy", "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
                                "ae_title": "REFUSER", "backoff_seconds": 0.5}], "PACSNODE")
    sleeps: list[float] = []
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=sleeps.append)
    assert report.ok and sleeps == [0.5]
    rows = attempts(job)
    assert [(r.status, r.status_code) for r in rows] == [("partial", 0xA700), ("success", 0)]
    assert len(rows[1].details["instances"]) == 1  # only the SEG was sent again
    assert sorted(calls.values()) == [1] * (len(job.sop_uids) - 1) + [2]


def test_association_rejected_permanently(job: JobWithOutputs, pyscp: Callable[..., PyScp]) -> None:
    scp = pyscp(lambda e: 0, ae_title="REALNAME", require_called_aet=True)
    dests = load_destinations([{"name": "wrong-aet", "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
                                "ae_title": "WRONGNAME"}], "PACSNODE")
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert job.state() == "delivery_failed" and not report.ok
    rows = attempts(job)
    assert len(rows) == 1 and rows[0].status == "refused"
    assert "rejected" in (rows[0].error or "").lower() and "Called AE" in (rows[0].error or "")


def test_sop_class_not_supported(job: JobWithOutputs, pyscp: Callable[..., PyScp]) -> None:
    """An SCP without the Segmentation SOP Class: those instances are refused (0x0122), the SR is stored."""
    scp = pyscp(lambda e: 0, contexts=[cx for cx in AllStoragePresentationContexts if cx.abstract_syntax != SEG])
    dests = load_destinations([{"name": "no-seg", "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
                                "ae_title": "REFUSER"}], "PACSNODE")
    deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert job.state() == "delivery_failed"
    rows = attempts(job)
    assert len(rows) == 1 and rows[0].status == "partial" and rows[0].status_code == 0x0122
    per = {i["sop_instance_uid"]: (i["status"], i["status_code"]) for i in rows[0].details["instances"]}
    for w in job.written:
        assert per[w.sop_instance_uid] == (("refused", 0x0122) if w.sop_class_uid == SEG else ("success", 0))
    assert [uid for uid, _ in scp.received] == [w.sop_instance_uid for w in job.written if w.sop_class_uid != SEG]


def test_state_rules(job: JobWithOutputs, tmp_path: Path) -> None:
    from peers import make_job_with_outputs

    queued = make_job_with_outputs(tmp_path / "q", state="queued")
    with pytest.raises(DeliveryError, match="queued"):
        deliver_job(queued.db, queued.job_id, [], queued.outputs_dir)
    with pytest.raises(DeliveryError, match="not found"):
        deliver_job(job.db, 999, [], job.outputs_dir)
    # no destination configured: done, outputs kept
    report = deliver_job(job.db, job.job_id, [], job.outputs_dir)
    assert report.ok and job.state() == "done" and attempts(job) == []
    # a tampered output file is not sent
    job.written[0].path.write_bytes(b"changed")
    report = deliver_job(job.db, job.job_id, load_destinations(
        [{"name": "x", "kind": "dimse", "host": "127.0.0.1", "port": 9, "ae_title": "X"}]), job.outputs_dir)
    assert job.state() == "delivery_failed" and attempts(job) == []
    queued.db.dispose()
