"""The node's SCP receiving Storage Commitment reports (N-EVENT-REPORT) on a
separate association, as an archive sends them: role selection, matching by
Transaction UID, and a defined answer to every malformed or unexpected report.
Runs on SQLite and PostgreSQL (the report row is locked on PostgreSQL)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from sqlalchemy import select

from pacs_node.db.models import Job, StorageCommitment, StorageCommitmentItem, Study
from pacs_node.ingest.commitment import STORAGE_COMMITMENT_PUSH_MODEL as SC
from pacs_node.ingest.commitment import STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE as SCI
from pacs_node.ingest.dimse import DimseServer
from pacs_node.node import Node

CT = "1.2.840.10008.5.1.4.1.1.2"
ARCHIVE = "ARCHIVE"


@pytest.fixture
def scp(node: Node) -> Iterator[DimseServer]:
    server = DimseServer(node.settings.dicom, node.ingestor)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_request(node: Node, uids: list[str], state: str = "pending") -> str:
    """A commitment row as the worker writes it before its N-ACTION; its Transaction UID."""
    txn = str(generate_uid(prefix=None))
    with node.db.session() as s:
        study = Study(study_instance_uid=str(generate_uid()))
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, study_version=1, state="delivering")
        s.add(job)
        s.flush()
        row = StorageCommitment(job_id=job.id, destination="archive", remote_ae=ARCHIVE, transaction_uid=txn,
                                attempt=1, state=state)
        row.items = [StorageCommitmentItem(sop_class_uid=CT, sop_instance_uid=u, status="pending") for u in uids]
        s.add(row)
    return txn


def row_of(node: Node, txn: str) -> tuple[StorageCommitment, dict[str, tuple[str, int | None]]]:
    with node.db.session() as s:
        row = s.execute(select(StorageCommitment).where(StorageCommitment.transaction_uid == txn)).scalar_one()
        items = {i.sop_instance_uid: (i.status, i.failure_reason) for i in row.items}
        s.expunge(row)
        return row, items


def refs(uids: list[str], reason: int | None = None, sop_class: str = CT) -> list[Dataset]:
    out = []
    for u in uids:
        ds = Dataset()
        ds.ReferencedSOPClassUID = sop_class
        ds.ReferencedSOPInstanceUID = u
        if reason is not None:
            ds.FailureReason = reason
        out.append(ds)
    return out


def report_ds(txn: str | None, ok: list[str], failed: Sequence[str] = (), reason: int = 0x0112) -> Dataset:
    ds = Dataset()
    if txn is not None:
        ds.TransactionUID = txn
    ds.ReferencedSOPSequence = refs(ok)
    if failed:
        ds.FailedSOPSequence = refs(list(failed), reason)
    return ds


def send_report(scp: DimseServer, info: Dataset, event_type: int = 1, calling: str = ARCHIVE,
                instance: str = SCI) -> Dataset:
    """N-EVENT-REPORT from ``calling``, proposing the SCP role for itself (as Orthanc does)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(SC, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE", ext_neg=[build_role(SC, scp_role=True)])
    assert assoc.is_established
    try:
        (cx,) = assoc.accepted_contexts
        assert (cx.as_scu, cx.as_scp) == (False, True)  # the archive is the SCP, the node the SCU
        status, _ = assoc.send_n_event_report(info, event_type, SC, instance)
        return status
    finally:
        assoc.release()


def test_report_recorded_committed_and_failed(node: Node, scp: DimseServer, caplog: pytest.LogCaptureFixture) -> None:
    uids = [str(generate_uid()) for _ in range(3)]
    txn = make_request(node, uids)
    with caplog.at_level(logging.INFO, logger="pacs_node.ingest.commitment"):
        status = send_report(scp, report_ds(txn, uids[:2], uids[2:]), event_type=2)
    assert status.Status == 0x0000
    row, items = row_of(node, txn)
    assert (row.state, row.event_type, row.report_association) == ("failed", 2, "separate")
    assert items == {uids[0]: ("committed", None), uids[1]: ("committed", None), uids[2]: ("failed", 0x0112)}
    assert row.reported_at is not None and "0x0112 no such object instance" in (row.error or "")
    assert not any(u in caplog.text for u in uids + [txn])  # UIDs are shortened in log lines


def test_late_report_after_timeout_still_counts(node: Node, scp: DimseServer) -> None:
    uids = [str(generate_uid()) for _ in range(2)]
    txn = make_request(node, uids, state="timeout")
    assert send_report(scp, report_ds(txn, uids)).Status == 0x0000
    row, items = row_of(node, txn)
    assert row.state == "committed" and set(items.values()) == {("committed", None)}


def test_missing_and_unknown_instances(node: Node, scp: DimseServer) -> None:
    uids = [str(generate_uid()) for _ in range(2)]
    txn = make_request(node, uids)
    stranger = str(generate_uid())
    assert send_report(scp, report_ds(txn, [uids[0], stranger])).Status == 0x0000
    row, items = row_of(node, txn)
    assert items == {uids[0]: ("committed", None), uids[1]: ("failed", None)}
    assert row.state == "failed"
    assert "1 instance(s) missing from the report" in (row.error or "")
    assert "1 instance(s) in the report were not asked for" in (row.error or "")
    assert stranger not in items


def test_class_instance_conflict(node: Node, scp: DimseServer) -> None:
    uid = str(generate_uid())
    txn = make_request(node, [uid])
    info = Dataset()
    info.TransactionUID = txn
    info.ReferencedSOPSequence = refs([uid], sop_class="1.2.840.10008.5.1.4.1.1.4")  # MR, but CT was asked
    assert send_report(scp, info).Status == 0x0000
    _, items = row_of(node, txn)
    assert items == {uid: ("failed", 0x0119)}


BAD_REPORTS = [
    ("unknown transaction", 0x0115, "unknown Transaction UID"),
    ("other AE title", 0x0115, "report not from the AE title that was asked"),
    ("no transaction uid", 0x0115, "no Transaction UID"),
    ("bad uid", 0x0115, "invalid Referenced SOP Instance UID"),
    ("event type 3", 0x0113, "event type 3 is not 1 or 2"),
    ("other sop instance", 0x0112, "not the well-known SOP Instance"),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the "bad uid" case, made on purpose
def test_bad_reports_are_refused(node: Node, scp: DimseServer, caplog: pytest.LogCaptureFixture) -> None:
    """Each case: its own status and Error Comment, a warning, nothing recorded."""
    for case, status, comment in BAD_REPORTS:
        uid = str(generate_uid())
        txn = make_request(node, [uid])
        info = report_ds(txn, [uid])
        kwargs: dict[str, Any] = {}
        if case == "unknown transaction":
            info.TransactionUID = str(generate_uid(prefix=None))
        elif case == "other AE title":
            kwargs["calling"] = "SPOOFER"
        elif case == "no transaction uid":
            del info.TransactionUID
        elif case == "bad uid":
            info.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.x"
        elif case == "event type 3":
            kwargs["event_type"] = 3
        elif case == "other sop instance":
            kwargs["instance"] = str(generate_uid())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pacs_node.ingest.commitment"):
            rsp = send_report(scp, info, **kwargs)
        assert (rsp.Status, case) == (status, case) and comment in str(rsp.get("ErrorComment", "")), case
        assert f"refused: 0x{status:04X} {comment}" in caplog.text, case
        row, items = row_of(node, txn)
        assert (row.state, items, case) == ("pending", {uid: ("pending", None)}, case)  # nothing recorded


def test_node_is_not_a_commitment_scp(node: Node, scp: DimseServer) -> None:
    """A modality asking the node to commit (default roles) gets 0x0211; one that
    proposes only the SCU role for itself has the context rejected."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SC, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        info = Dataset()
        info.TransactionUID = str(generate_uid(prefix=None))
        info.ReferencedSOPSequence = refs([str(generate_uid())])
        status, _ = assoc.send_n_action(info, 1, SC, SCI)
        assert status.Status == 0x0211
    finally:
        assoc.release()

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(SC, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACSNODE",
                         ext_neg=[build_role(SC, scu_role=True, scp_role=False)])
    assert assoc.is_established
    try:
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
    finally:
        assoc.release()
