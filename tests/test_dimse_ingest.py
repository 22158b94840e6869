"""DIMSE ingest against real peers over loopback: pynetdicom SCU and dcmtk."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, RLELossless, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from nodetest import require_tool
from dicom_factory import make_instance, make_study, to_bytes, write_files
from pacs_node.db.models import Instance, Series, Study
from pacs_node.ingest.dimse import DimseServer
from pacs_node.ingest.recorder import Status
from pacs_node.node import Node

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def scp(node: Node) -> Iterator[DimseServer]:
    server = DimseServer(node.settings.dicom, node.ingestor)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _assoc(scp: DimseServer, contexts: list[tuple[str, str]], calling: str = "TESTSCU", called: str = "PACSNODE"):
    ae = AE(ae_title=calling)
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    return ae.associate("127.0.0.1", scp.port, ae_title=called)


def _count(node: Node, model: type) -> int:
    with node.db.sessionmaker() as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def test_pynetdicom_scu_stores_multiseries_study(node: Node, scp: DimseServer) -> None:
    study = make_study(n_series=3, per_series=3)
    assoc = _assoc(scp, [(study[0].SOPClassUID, study[0].file_meta.TransferSyntaxUID)])
    assert assoc.is_established
    # TCP_NODELAY is set on the accepted socket: check from the SCP side.
    active = scp._server.active_associations  # type: ignore[union-attr]
    nodelay = [a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for a in active]
    assert nodelay and all(nodelay)
    for ds in study:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    for ds in study:
        path = node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert path.read_bytes()[128:132] == b"DICM"
        assert dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert _count(node, Instance) == 9
    assert _count(node, Series) == 3
    with node.db.sessionmaker() as s:
        st = s.execute(select(Study)).scalar_one()
        assert st.num_instances == 9 and st.calling_aet == "TESTSCU"


def test_storescu_sends_study_and_compressed_syntaxes(node: Node, scp: DimseServer, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    study = make_study(n_series=3, per_series=2)
    files = write_files(study, tmp_path / "in")
    cmd = [storescu, "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(scp.port), *map(str, files)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=NODELAY_ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    # Compressed transfer syntaxes are stored as received (not transcoded);
    # storescu proposes one compressed syntax per run (-xw J2K, -xr RLE, ...).
    compressed = {
        "-xw": get_testdata_file("JPEG2000.dcm"),
        "-xr": get_testdata_file("MR_small_RLE.dcm"),
        "-xy": get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"),
    }
    for flag, f in compressed.items():
        cmd = [storescu, flag, "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(scp.port), str(f)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=NODELAY_ENV, timeout=60)
        assert res.returncode == 0, res.stderr
    assert _count(node, Instance) == len(files) + len(compressed)
    for f in compressed.values():
        ds = dcmread(f)
        stored = node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        got = dcmread(stored)
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got.PixelData == ds.PixelData  # bytes as received
    with node.db.sessionmaker() as s:
        tsyn = set(s.execute(select(Instance.transfer_syntax_uid)).scalars())
    assert {JPEGBaseline8Bit, RLELossless} <= tsyn


def test_echoscu(scp: DimseServer) -> None:
    echoscu = require_tool("echoscu")
    res = subprocess.run([echoscu, "-aec", "PACSNODE", "127.0.0.1", str(scp.port)],
                         capture_output=True, text=True, env=NODELAY_ENV, timeout=30)
    assert res.returncode == 0, res.stderr


def _send_raw(scp: DimseServer, ds: Dataset, *, raw: bytes | None = None, tmp: Path | None = None) -> Dataset:
    """C-STORE ``ds``; with ``raw``, send a file whose meta is ``ds``'s and
    whose data set bytes are ``raw`` (pynetdicom sends a file path as-is)."""
    assoc = _assoc(scp, [(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)])
    assert assoc.is_established
    try:
        if raw is None:
            return assoc.send_c_store(ds)
        from io import BytesIO

        from pydicom.filewriter import write_file_meta_info

        buf = BytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, ds.file_meta)
        buf.write(raw)
        assert tmp is not None
        path = tmp / "raw.dcm"
        path.write_bytes(buf.getvalue())
        from pynetdicom import _config

        old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            return assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
    finally:
        assoc.release()


def test_garbage_bytes_get_c210_and_server_keeps_serving(node: Node, scp: DimseServer, tmp_path: Path) -> None:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    rsp = _send_raw(scp, ds, raw=b"\xde\xad\xbe\xef garbage " * 8, tmp=tmp_path)
    assert rsp.Status == Status.CANNOT_UNDERSTAND
    assert "decode" in str(rsp.ErrorComment)
    assert _count(node, Instance) == 0
    assert _send_raw(scp, ds).Status == 0x0000  # still serving


@pytest.mark.parametrize(
    ("attr", "value", "status"),
    [
        ("StudyInstanceUID", None, Status.INVALID_UID),
        ("SeriesInstanceUID", "", Status.INVALID_UID),
        ("StudyInstanceUID", "../../../../tmp/evil", Status.INVALID_UID),
        ("SeriesInstanceUID", "1.2.3/../../x", Status.INVALID_UID),
    ],
)
def test_missing_or_crafted_uids(node: Node, scp: DimseServer, attr: str, value: str | None, status: int) -> None:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    if value is None:
        delattr(ds, attr)
    else:
        setattr(ds, attr, value)
    rsp = _send_raw(scp, ds)
    assert rsp.Status == status
    assert attr in str(rsp.ErrorComment)
    assert _count(node, Instance) == 0
    root = node.store.root
    outside = [p for p in root.parent.rglob("*") if p.is_file() and not p.is_relative_to(root) and "evil" in str(p)]
    assert outside == []
    assert not Path("/tmp/evil.dcm").exists()


def test_sop_uid_mismatch(node: Node, scp: DimseServer, tmp_path: Path) -> None:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    other = generate_uid()
    rsp = _send_raw(scp, ds, raw=to_bytes_without_meta(ds, sop_uid=other), tmp=tmp_path)
    assert rsp.Status == Status.UID_MISMATCH
    assert _count(node, Instance) == 0


def to_bytes_without_meta(ds: Dataset, *, sop_uid: str) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    copy = ds.copy()
    copy.SOPInstanceUID = sop_uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, copy)
    return buf.getvalue()


def test_duplicate_is_idempotent_and_counted(node: Node, scp: DimseServer) -> None:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    for _ in range(3):
        assert _send_raw(scp, ds).Status == 0x0000
    with node.db.sessionmaker() as s:
        inst = s.execute(select(Instance)).scalar_one()
        study = s.execute(select(Study)).scalar_one()
    assert inst.receive_count == 3
    assert study.num_instances == 1
    files = list(node.store.root.rglob("*.dcm"))
    assert len(files) == 1 and dcmread(files[0]) == ds


def test_same_sop_uid_under_another_study_is_refused(node: Node, scp: DimseServer) -> None:
    sop = generate_uid()
    a = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=sop)
    b = make_instance(study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=sop)
    assert _send_raw(scp, a).Status == 0x0000
    assert _send_raw(scp, b).Status == Status.UID_CONFLICT
    assert _count(node, Instance) == 1


def test_disk_full_gets_a700_and_nothing_recorded(
    node: Node, scp: DimseServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, fh):  # type: ignore[no-untyped-def]
            self.fh = fh

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *a):  # type: ignore[no-untyped-def]
            self.fh.close()

        def write(self, data):  # type: ignore[no-untyped-def]
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pacs_node.ingest.storage.os.fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with caplog.at_level(logging.ERROR):
        rsp = _send_raw(scp, ds)
    assert rsp.Status == Status.OUT_OF_RESOURCES
    assert "storage is full" in str(rsp.ErrorComment)
    assert "storage full" in caplog.text
    assert _count(node, Instance) == 0
    assert list(node.store.root.rglob("*.tmp")) == []  # temporary file cleaned up
    monkeypatch.undo()
    assert _send_raw(scp, ds).Status == 0x0000


def test_min_free_bytes_refuses_before_writing(node: Node, scp: DimseServer) -> None:
    node.store.min_free_bytes = node.store.free_bytes() + 10**12
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    assert _send_raw(scp, ds).Status == Status.OUT_OF_RESOURCES


def test_unexpected_exception_answers_failure_and_logs(
    node: Node, scp: DimseServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(node.ingestor, "ingest", boom)
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    with caplog.at_level(logging.ERROR):
        assert _send_raw(scp, ds).Status == Status.PROCESSING_FAILURE
    assert "Traceback" in caplog.text or "RuntimeError" in caplog.text
    monkeypatch.undo()
    assert _send_raw(scp, ds).Status == 0x0000


def test_database_down_gets_a700(node: Node, scp: DimseServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    def down(*a, **k):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(node.ingestor, "_record", down)
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    rsp = _send_raw(scp, ds)
    assert rsp.Status == Status.OUT_OF_RESOURCES
    assert "database" in str(rsp.ErrorComment)


def test_unknown_sop_class_context_is_rejected(scp: DimseServer) -> None:
    assoc = _assoc(scp, [("1.2.3.4.5.6.7.8.9", "1.2.840.10008.1.2.1"), ("1.2.840.10008.1.1", "1.2.840.10008.1.2")])
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    assert "1.2.3.4.5.6.7.8.9" in rejected and "1.2.840.10008.1.1" in accepted
    assoc.release()


def test_labelmap_seg_is_supported(scp: DimseServer) -> None:
    assoc = _assoc(scp, [("1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.1.2.1")])
    assert assoc.is_established and len(assoc.accepted_contexts) == 1
    assoc.release()


def test_refused_calling_and_called_ae(tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    from nodetest import make_settings

    settings = make_settings(tmp_path, sqlite_url, dicom__allowed_calling_aets='["GOODPACS"]')
    node = Node.from_settings(settings, migrate=True)
    server = DimseServer(settings.dicom, node.ingestor)
    server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="pacs_node"):
            bad = _assoc(server, [("1.2.840.10008.1.1", "1.2.840.10008.1.2")], calling="EVILPACS")
        assert bad.is_rejected
        rj = bad.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        assert "EVILPACS" in caplog.text and "calling AE title not recognised" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pacs_node"):
            wrong = _assoc(server, [("1.2.840.10008.1.1", "1.2.840.10008.1.2")], calling="GOODPACS", called="NOTME")
        assert wrong.is_rejected
        rj = wrong.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
        assert "NOTME" in caplog.text and "called AE title not recognised" in caplog.text
        ok = _assoc(server, [("1.2.840.10008.1.1", "1.2.840.10008.1.2")], calling="GOODPACS")
        assert ok.is_established
        ok.release()
        # dcmtk's echoscu sees the rejection too.
        echoscu = require_tool("echoscu")
        res = subprocess.run([echoscu, "-aet", "EVILPACS", "-aec", "PACSNODE", "127.0.0.1", str(server.port)],
                             capture_output=True, text=True, env=NODELAY_ENV, timeout=30)
        assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stderr + res.stdout
    finally:
        server.stop()
        node.close()


def test_row_commits_only_after_the_file_is_durable(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """The durability rule: no row is committed before its file is fsynced."""
    import threading
    import time

    from pacs_node.ingest.recorder import parse_meta

    node.store.fsync = True
    ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    data = to_bytes(ds)
    meta = parse_meta(data)
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        in_fsync.set()
        assert release.wait(20)
        real_fsync(fd)

    monkeypatch.setattr("pacs_node.ingest.storage.os.fsync", slow_fsync)
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", node.ingestor.ingest(data, meta, source="dimse")))
    t.start()
    try:
        assert in_fsync.wait(20)
        time.sleep(0.5)  # ample time for the row statements; the commit must still wait
        assert t.is_alive()
        with node.db.read_connection() as conn:  # a deferred read: takes no write lock
            assert conn.execute(select(func.count()).select_from(Instance)).scalar_one() == 0
    finally:
        release.set()
        t.join(20)
    assert getattr(out["r"], "status") == Status.SUCCESS
    assert _count(node, Instance) == 1
    assert (node.store.root / getattr(out["r"], "relpath")).read_bytes() == data


def test_probe_connections_do_not_hold_association_slots(tmp_path: Path, sqlite_url: str) -> None:
    """TCP health checks and port scans (connect, then close without an
    A-ASSOCIATE-RQ) must not use up ``max_associations``: a PACS that comes
    right after a burst of probes is accepted, and the slots free at once."""
    import time

    from nodetest import make_settings

    settings = make_settings(tmp_path, sqlite_url, dicom__max_associations="2", dicom__acse_timeout="30")
    node = Node.from_settings(settings, migrate=True)
    server = DimseServer(settings.dicom, node.ingestor)
    server.start()
    try:
        echo = [require_tool("echoscu"), "-aet", "PACS", "-aec", "PACSNODE", "127.0.0.1", str(server.port)]

        def wait_idle(seconds: float) -> list[object]:
            deadline = time.monotonic() + seconds
            while server.ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            return list(server.ae.active_associations)

        for _ in range(20):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        # The listen backlog is FIFO: once a real association made after the
        # probes is accepted, the server has accepted every probe. Probes still
        # being torn down may briefly hold both slots on a loaded machine, so
        # the PACS may retry; without the fix the slots stay held for 30 s.
        deadline = time.monotonic() + 5
        while True:
            res = subprocess.run(echo, capture_output=True, text=True, env=NODELAY_ENV, timeout=30)
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert res.returncode == 0, res.stdout + res.stderr
        assert wait_idle(5) == []
        # A probe still open holds no association slot (it counts against the
        # per-address connection limit until the pre-association timeout).
        held = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        deadline = time.monotonic() + 5
        while not server.guard.connections("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.guard.connections("127.0.0.1") == 1
        assert server.ae.active_associations == []
        held.close()
        deadline = time.monotonic() + 5
        while server.guard.connections("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.guard.connections("127.0.0.1") == 0
        res = subprocess.run(echo, capture_output=True, text=True, env=NODELAY_ENV, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        study = make_study(n_series=1, per_series=2)
        assoc = _assoc(server, [(study[0].SOPClassUID, study[0].file_meta.TransferSyntaxUID)])
        assert assoc.is_established
        assert [int(assoc.send_c_store(ds).Status) for ds in study] == [0, 0]
        assoc.release()
    finally:
        server.stop()
        node.close()


def test_accepted_associations_poll_fast_only_while_data_flows(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DUL of an accepted association sleeps ``active_poll_ms`` between
    loops while data arrives and pynetdicom's 1 ms once the peer goes quiet;
    ``active_poll_ms = 0`` leaves pynetdicom's DUL untouched."""
    import time

    from pynetdicom.dul import DULServiceProvider

    from nodetest import make_settings
    from pacs_node.ingest import polling

    monkeypatch.setattr(polling, "ACTIVE_WINDOW", 2.0)
    study = make_study(n_series=1, per_series=2)
    for poll_ms, expect_class in (("0.1", polling.AdaptivePollDUL), ("0", DULServiceProvider)):
        settings = make_settings(tmp_path / poll_ms, f"sqlite:///{tmp_path / (poll_ms + '.db')}",
                                 dicom__active_poll_ms=poll_ms)
        node = Node.from_settings(settings, migrate=True)
        server = DimseServer(settings.dicom, node.ingestor)
        server.start()
        try:
            assoc = _assoc(server, [(study[0].SOPClassUID, study[0].file_meta.TransferSyntaxUID)])
            assert assoc.is_established
            assert [int(assoc.send_c_store(ds).Status) for ds in study] == [0, 0]
            peer = server.ae.active_associations[0]
            assert type(peer.dul) is expect_class
            if expect_class is polling.AdaptivePollDUL:
                assert peer.dul._run_loop_delay == pytest.approx(0.0001)  # data just arrived
                time.sleep(2.3)
                assert peer.dul._run_loop_delay == polling.IDLE_DELAY  # quiet: pynetdicom's 1 ms
                assert int(assoc.send_c_store(study[0]).Status) == 0  # a duplicate: fast again
                assert peer.dul._run_loop_delay == pytest.approx(0.0001)
                # Two associations moving data: CPU-bound, both keep pynetdicom's 1 ms.
                other = _assoc(server, [(study[0].SOPClassUID, study[0].file_meta.TransferSyntaxUID)])
                assert int(other.send_c_store(study[1]).Status) == 0
                assert int(assoc.send_c_store(study[0]).Status) == 0
                time.sleep(0.05)  # past the 10 ms recount
                assert polling.active_associations() == 2
                assert all(a.dul._run_loop_delay == polling.IDLE_DELAY for a in server.ae.active_associations)
                other.release()
            else:
                assert peer.dul._run_loop_delay == polling.IDLE_DELAY
            assoc.release()
        finally:
            server.stop()
            node.close()
    assert not polling.enable_adaptive_polling(object(), 0.0001)  # type: ignore[arg-type]
