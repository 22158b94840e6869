"""Storage Commitment Push Model after delivery, against real peers.

Orthanc (1.10.1 here) is the Storage Commitment SCP: it answers the N-ACTION on
the node's association and sends the N-EVENT-REPORT on a new association to the
modality its ``DicomModalities`` declares for the calling AE title, here the
node's own C-STORE SCP (:class:`~pacs_node.ingest.dimse.DimseServer`). dcmtk
has no Storage Commitment SCP (``storescp`` rejects the SOP Class), so it is the
"not supported" destination. A pynetdicom SCP stands in for an archive that
reports on the N-ACTION's own association.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import select

from nodetest import free_port
from pacs_node.config import DicomSettings
from pacs_node.db.models import DeliveryAttempt, Job, StorageCommitment
from pacs_node.ingest.commitment import STORAGE_COMMITMENT_PUSH_MODEL as SC
from pacs_node.ingest.commitment import STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE as SCI
from pacs_node.ingest.dimse import DimseServer
from pacs_node.ingest.recorder import Ingestor
from pacs_node.ingest.storage import InstanceStore
from pacs_node.jobs.queries import get_job
from peers import JobWithOutputs, OrthancServer, StoreSCP, start_orthanc
from worker.deliver.base import DeliveryItem, DeliveryResult
from worker.deliver.dimse import DimseDeliverer
from worker.deliver.service import deliver_job
from worker.deliver.settings import DestinationSettings, load_destinations

NODE_AET = "PACSNODE"
DEAD_AET = "DEADNODE"  # declared in Orthanc at a port where nothing listens: no report ever arrives


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def sc_orthanc(tmp_path_factory: pytest.TempPathFactory, node_port: int) -> Iterator[OrthancServer]:
    """Orthanc that knows the node (report to its SCP) and a node that is down."""
    modalities = {
        "pacsnode": {"AET": NODE_AET, "Host": "127.0.0.1", "Port": node_port, "AllowStorageCommitment": True},
        "deadnode": {"AET": DEAD_AET, "Host": "127.0.0.1", "Port": free_port(), "AllowStorageCommitment": True},
    }
    with start_orthanc(tmp_path_factory.mktemp("orthanc-sc"), extra_config={"DicomModalities": modalities}) as o:
        yield o


@pytest.fixture
def orthanc_sc(sc_orthanc: OrthancServer) -> OrthancServer:
    sc_orthanc.clear()
    return sc_orthanc


@pytest.fixture
def node_scp(job: JobWithOutputs, node_port: int, tmp_path: Path) -> Iterator[DimseServer]:
    """The node's C-STORE SCP on the port Orthanc reports to, over the job's database."""
    server = DimseServer(DicomSettings(ae_title=NODE_AET, port=node_port),
                         Ingestor(job.db, InstanceStore(tmp_path / "storage", fsync=False)))
    server.start()
    yield server
    server.stop()


def commitments(job: JobWithOutputs) -> list[StorageCommitment]:
    with job.db.session() as s:
        rows = list(s.execute(select(StorageCommitment).where(StorageCommitment.job_id == job.job_id)
                              .order_by(StorageCommitment.id)).scalars())
        for r in rows:
            _ = r.items  # load while the session is open
        s.expunge_all()
        return rows


def attempts(job: JobWithOutputs) -> list[DeliveryAttempt]:
    with job.db.session() as s:
        return list(s.execute(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job.job_id)
                              .order_by(DeliveryAttempt.id)).scalars())


def job_error(job: JobWithOutputs) -> str:
    with job.db.session() as s:
        j = s.get(Job, job.job_id)
        assert j is not None
        return j.error or ""


def seg_uid(job: JobWithOutputs) -> str:
    return next(w.sop_instance_uid for w in job.written if w.kind == "seg")


def test_round_trip_with_orthanc(job: JobWithOutputs, orthanc_sc: OrthancServer, node_scp: DimseServer,
                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SEG + SR delivered, commitment asked, the report comes on a separate
    association to the node's SCP, and every instance is recorded committed."""
    dests = load_destinations([orthanc_sc.destination("dimse", storage_commitment=True, commitment_timeout=15)],
                              NODE_AET)
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert report.ok and job.state() == "done", job_error(job)
    assert report.destinations[0].commitment == "committed"
    assert all(orthanc_sc.find_instance(u) for u in job.sop_uids)
    (row,) = commitments(job)
    assert (row.state, row.event_type, row.report_association, row.attempt, row.status_code) == (
        "committed", 1, "separate", 1, 0)
    assert row.transaction_uid.startswith("2.25.") and row.reported_at is not None and row.error is None
    assert {i.sop_instance_uid: (i.status, i.failure_reason) for i in row.items} == {
        u: ("committed", None) for u in job.sop_uids}
    # the job's delivery view shows it
    with job.db.session() as s:
        detail = get_job(s, job.job_id)
    assert detail is not None and [c.state for c in detail.commitments] == ["committed"]
    assert {i.sop_instance_uid for i in detail.commitments[0].instances} == job.sop_uids
    assert "storage commitment: committed" in (detail.events[-1].message or "")
    # and `pacs-node jobs show`
    from pacs_node.cli import main

    monkeypatch.setenv("PACS_NODE_DATABASE__URL", str(job.db.url.render_as_string(hide_password=False)))
    assert main(["jobs", "show", str(job.job_id)]) == 0
    shown = capsys.readouterr().out
    assert "storage commitment:" in shown and f"orthanc-dimse #1: committed {len(job.sop_uids)} committed" in shown


def test_round_trip_over_dicom_tls(job: JobWithOutputs, node_port: int, node_scp: DimseServer,
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """An Orthanc that speaks only DICOM TLS and requires a client certificate:
    the C-STOREs and the N-ACTION go over TLS (the destination's tls* keys); its
    report comes back to the node's plain SCP."""
    from tlscerts import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki-sc"))
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server_cert),
           "DicomTlsPrivateKey": str(pki.server_key), "DicomTlsTrustedCertificates": str(pki.ca),
           "DicomTlsRemoteCertificateRequired": True,
           "DicomModalities": {"pacsnode": {"AET": NODE_AET, "Host": "127.0.0.1", "Port": node_port,
                                            "UseDicomTls": False}}}
    with start_orthanc(tmp_path_factory.mktemp("orthanc-tls"), extra_config=tls) as o:
        table = o.destination("dimse", storage_commitment=True, commitment_timeout=15, tls=True,
                              tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
        report = deliver_job(job.db, job.job_id, load_destinations([table], NODE_AET), job.outputs_dir,
                             sleep=lambda s: pytest.fail("no retry"))
        assert report.ok and job.state() == "done", job_error(job)
        assert all(o.find_instance(u) for u in job.sop_uids)
    (row,) = commitments(job)
    assert (row.state, row.report_association) == ("committed", "separate")


class LosingDeliverer(DimseDeliverer):
    """C-STORE, then the archive loses the SEG (deleted through Orthanc's REST API)."""

    orthanc: OrthancServer
    lose: Callable[[int], bool]
    sends = 0

    def send(self, items: Sequence[DeliveryItem]) -> DeliveryResult:
        result = super().send(items)
        type(self).sends += 1
        if self.lose(type(self).sends):
            for item in items:
                if item.kind == "seg":
                    oid = self.orthanc.find_instance(item.sop_instance_uid)
                    assert oid is not None
                    httpx.delete(f"{self.orthanc.url}/instances/{oid}", timeout=10).raise_for_status()
        return result


def losing_factory(orthanc: OrthancServer, lose: Callable[[int], bool]) -> Callable[[DestinationSettings], Any]:
    cls = type("Losing", (LosingDeliverer,), {"orthanc": orthanc, "lose": staticmethod(lose), "sends": 0})
    return lambda dest: cls(dest)


def test_failed_instance_is_sent_again_and_committed(job: JobWithOutputs, orthanc_sc: OrthancServer,
                                                     node_scp: DimseServer) -> None:
    dests = load_destinations([orthanc_sc.destination("dimse", storage_commitment=True, commitment_timeout=15,
                                                      max_attempts=3, backoff_seconds=0.25)], NODE_AET)
    sleeps: list[float] = []
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=sleeps.append,
                         deliverer_factory=losing_factory(orthanc_sc, lambda n: n == 1))
    assert report.ok and job.state() == "done", job_error(job)
    first, second = commitments(job)
    assert (first.attempt, first.state, first.event_type) == (1, "failed", 2)
    per = {i.sop_instance_uid: (i.status, i.failure_reason) for i in first.items}
    assert per.pop(seg_uid(job)) == ("failed", 0x0112)  # no such object instance
    assert set(per.values()) == {("committed", None)}
    assert "0x0112 no such object instance" in (first.error or "")
    # only the lost SEG was sent again and asked about again
    rows = attempts(job)
    assert [(r.attempt, r.status, len(r.details["instances"])) for r in rows] == [
        (1, "success", len(job.sop_uids)), (2, "success", 1)]
    assert (second.attempt, second.state) == (2, "committed")
    assert [i.sop_instance_uid for i in second.items] == [seg_uid(job)]
    assert sleeps == [0.25]


def test_failed_commitment_gives_up_after_max_attempts(job: JobWithOutputs, orthanc_sc: OrthancServer,
                                                       node_scp: DimseServer) -> None:
    dests = load_destinations([orthanc_sc.destination("dimse", storage_commitment="auto", commitment_timeout=15,
                                                      max_attempts=2, backoff_seconds=0.1)], NODE_AET)
    report = deliver_job(job.db, job.job_id, dests, job.outputs_dir, sleep=lambda s: None,
                         deliverer_factory=losing_factory(orthanc_sc, lambda n: True))
    assert not report.ok and job.state() == "delivery_failed"
    assert report.destinations[0].status == "uncommitted" and report.destinations[0].commitment == "failed"
    rows = commitments(job)
    assert [(r.attempt, r.state) for r in rows] == [(1, "failed"), (2, "failed")]
    assert [(i.status, i.failure_reason) for i in rows[1].items] == [("failed", 0x0112)]
    error = job_error(job)
    assert "storage commitment failed" in error and "0x0112 no such object instance" in error


def test_destination_without_storage_commitment(job: JobWithOutputs, storescp: Callable[..., StoreSCP]) -> None:
    """dcmtk storescp rejects the SOP Class: "auto" records not_supported and the
    delivery succeeds; "true" (required) fails it without retrying."""
    scp = storescp()
    auto = load_destinations([scp.destination(storage_commitment="auto")], NODE_AET)
    report = deliver_job(job.db, job.job_id, auto, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert report.ok and job.state() == "done"
    assert report.destinations[0].commitment == "not_supported"
    assert {ds.SOPInstanceUID for ds in scp.received()} == job.sop_uids
    (row,) = commitments(job)
    assert (row.state, row.status_code, row.event_type) == ("not_supported", 0x0122, None)
    assert "does not support the Storage Commitment" in (row.error or "")
    assert {i.status for i in row.items} == {"pending"}

    required = load_destinations([scp.destination(storage_commitment=True)], NODE_AET)
    report = deliver_job(job.db, job.job_id, required, job.outputs_dir, sleep=lambda s: pytest.fail("no retry"))
    assert not report.ok and job.state() == "delivery_failed"
    assert [(r.attempt, r.state) for r in commitments(job)] == [(1, "not_supported"), (2, "not_supported")]
    assert "storage commitment not_supported" in job_error(job)


def test_no_report_times_out_and_is_asked_again(job: JobWithOutputs, orthanc_sc: OrthancServer) -> None:
    """Orthanc accepts the N-ACTION but cannot reach the (declared) requester:
    each request times out, is asked again, and the delivery fails."""
    table = orthanc_sc.destination("dimse", storage_commitment=True, commitment_timeout=1.0, max_attempts=2,
                                   backoff_seconds=0.05, calling_ae_title=DEAD_AET)
    sleeps: list[float] = []
    report = deliver_job(job.db, job.job_id, load_destinations([table], NODE_AET), job.outputs_dir,
                         sleep=sleeps.append)
    assert not report.ok and job.state() == "delivery_failed"
    rows = commitments(job)
    assert [(r.attempt, r.state, r.status_code) for r in rows] == [(1, "timeout", 0), (2, "timeout", 0)]
    assert all(i.status == "pending" for r in rows for i in r.items)
    assert len(attempts(job)) == 1  # nothing was sent again: the instances were stored
    assert sleeps == [0.05]
    assert "no N-EVENT-REPORT within 1 s" in job_error(job)


def test_archive_that_does_not_know_the_caller(job: JobWithOutputs, orthanc_sc: OrthancServer) -> None:
    """Orthanc aborts the N-ACTION of an AE title missing from its DicomModalities:
    an error, asked again under the retry rules, then the delivery fails."""
    table = orthanc_sc.destination("dimse", storage_commitment="auto", max_attempts=2, backoff_seconds=0.01,
                                   calling_ae_title="STRANGER")
    report = deliver_job(job.db, job.job_id, load_destinations([table], NODE_AET), job.outputs_dir,
                         sleep=lambda s: None)
    assert not report.ok and job.state() == "delivery_failed"
    rows = commitments(job)
    assert [(r.attempt, r.state, r.status_code) for r in rows] == [(1, "error", None), (2, "error", None)]
    assert "aborted the association instead of answering the N-ACTION" in (rows[0].error or "")
    assert "does it know the calling AE title STRANGER" in job_error(job)


class SameAssociationSCP:
    """A pynetdicom Storage Commitment SCP that reports on the N-ACTION's association."""

    def __init__(self, fail_uid: str | None = None) -> None:
        self.port = free_port()
        self.fail_uid = fail_uid
        ae = AE(ae_title="SAMEASSOC")
        ae.add_supported_context(SC, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.responses: list[int] = []

        requests: dict[int, Dataset] = {}

        def on_action(event: Any) -> tuple[int, None]:
            requests[id(event.assoc)] = event.action_information
            return 0x0000, None

        def on_sent(event: Any) -> None:
            # report once the N-ACTION response is on its way (before it, the
            # requestor would read the report as the response)
            if type(event.message).__name__ == "N_ACTION_RSP" and id(event.assoc) in requests:
                info = requests.pop(id(event.assoc))
                threading.Thread(target=self._report, args=(event.assoc, info), daemon=True).start()

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_ACTION, on_action), (evt.EVT_DIMSE_SENT, on_sent)])

    def _report(self, assoc: Any, info: Dataset) -> None:
        time.sleep(0.05)  # the response's PDU is queued by the reactor thread right after EVT_DIMSE_SENT
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, failed = [], []
        for ref in info.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            if ref.ReferencedSOPInstanceUID == self.fail_uid:
                item.FailureReason = 0x0110
                failed.append(item)
            else:
                ok.append(item)
        report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        status, _ = assoc.send_n_event_report(report, 2 if failed else 1, SC, SCI)
        self.responses.append(int(status.Status))

    def stop(self) -> None:
        assert self.server is not None
        for assoc in list(self.server.active_associations):  # released by the node: let them end
            assoc.join(timeout=5)  # (shutdown() would abort one still closing its socket)
        self.server.shutdown()


def test_report_on_the_same_association(job: JobWithOutputs, storescp: Callable[..., StoreSCP]) -> None:
    store = storescp()
    archive = SameAssociationSCP()
    try:
        table = {"name": "same", "kind": "dimse", "host": "127.0.0.1", "port": archive.port,
                 "ae_title": "SAMEASSOC", "storage_commitment": True, "commitment_timeout": 10}
        (dest,) = load_destinations([table], NODE_AET)
        # the instances go to storescp, the commitment to the pynetdicom SCP
        send_to_store = load_destinations([store.destination()], NODE_AET)[0]
        report = deliver_job(job.db, job.job_id, [dest], job.outputs_dir, sleep=lambda s: pytest.fail("no retry"),
                             deliverer_factory=lambda d: DimseDeliverer(send_to_store))
    finally:
        archive.stop()
    assert report.ok and job.state() == "done", job_error(job)
    (row,) = commitments(job)
    assert (row.state, row.event_type, row.report_association) == ("committed", 1, "same")
    assert archive.responses == [0x0000]


def test_metric_counts_commitments_per_state(job: JobWithOutputs, storescp: Callable[..., StoreSCP]) -> None:
    from types import SimpleNamespace

    from pacs_node.api.metrics import NodeCollector

    scp = storescp()
    deliver_job(job.db, job.job_id, load_destinations([scp.destination(storage_commitment="auto")], NODE_AET),
                job.outputs_dir, sleep=lambda s: None)
    collector = NodeCollector(SimpleNamespace(db=job.db), lambda: None)  # type: ignore[arg-type]
    (family,) = [f for f in collector.collect() if f.name == "pacs_node_storage_commitments"]
    values = {s.labels["state"]: s.value for s in family.samples}
    assert values["not_supported"] == 1.0 and values["committed"] == 0.0 and values["pending"] == 0.0
