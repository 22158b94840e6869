"""Network limits of the DIMSE SCP (pacs_node.ingest.guard / .spool), each
attack run with raw sockets against the in-process node while a real
dcmtk storescu sends a study from another address and must succeed; memory
is the resident size of this process (the node runs in it)."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_factory import make_instance, make_study, write_files
from nodetest import make_settings, require_tool
from pacs_node.config import ConfigError
from pacs_node.db.models import Instance
from pacs_node.ingest.dimse import DimseServer
from pacs_node.node import Node

ATTACKER = "127.0.0.2"
NODELAY_ENV = {"TCP_NODELAY": "1"}
ABORT_INVALID = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
MIB = 1 << 20


# --------------------------------------------------------------------------- helpers
@contextmanager
def running(tmp_path: Path, sqlite_url: str, **dicom: object) -> Iterator[tuple[Node, DimseServer]]:
    settings = make_settings(tmp_path, sqlite_url, storage__fsync="false",
                             **{f"dicom__{k}": v for k, v in dicom.items()})
    node = Node.from_settings(settings, migrate=True)
    server = DimseServer(settings.dicom, node.ingestor)
    server.start()
    try:
        yield node, server
    finally:
        server.stop()
        node.close()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class RssPeak(threading.Thread):
    """Samples this process's resident size every 20 ms until :meth:`growth`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base = rss_mb()
        self.peak = self.base
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def growth(self) -> float:
        self._done.set()
        self.join(5)
        return self.peak - self.base


def rq_bytes(calling: str = "ATTACKER", called: str = "PACSNODE", max_pdu: int = 16382,
             contexts: tuple[str, ...] = (str(Verification), str(CTImageStorage))) -> bytes:
    """An encoded A-ASSOCIATE-RQ (pynetdicom's PDU classes)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cxs = []
    for i, uid in enumerate(contexts):
        cx = build_context(uid, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    prim.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One PDU (header and body), or b"" when the node closed the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < 6:
            chunk = sock.recv(6 - len(data))
            if not chunk:
                return b""
            data += chunk
        (length,) = struct.unpack(">L", data[2:6])
        while len(data) < 6 + length:
            chunk = sock.recv(6 + length - len(data))
            if not chunk:
                return b""
            data += chunk
    except ConnectionResetError:
        return b""
    return data


def raw_association(port: int, source: str = ATTACKER) -> socket.socket:
    """A TCP connection with an established association (Verification = 1, CT = 3)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(rq_bytes())
    ac = read_pdu(sock)
    assert ac[:1] == b"\x02", ac[:16]
    return sock


def c_store_pdus(ds: Dataset, context_id: int = 3, msg_id: int = 1, max_pdu: int = 16382) -> bytes:
    """The P-DATA-TF PDUs of one C-STORE-RQ of ``ds`` (Implicit VR Little Endian)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    from io import BytesIO

    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    out = b""
    for p_data in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return out


def storescu(port: int, files: list[Path], aet: str = "LEGIT", *flags: str) -> subprocess.Popen[str]:
    import os

    exe = require_tool("storescu")
    return subprocess.Popen([exe, *flags, "-aet", aet, "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **NODELAY_ENV})


def legit_study(tmp_path: Path) -> tuple[list[Dataset], list[Path]]:
    study = make_study(n_series=1, per_series=3)
    return study, write_files(study, tmp_path / "legit")


def stored(node: Node, study: list[Dataset]) -> int:
    uids = [str(ds.SOPInstanceUID) for ds in study]
    with node.db.sessionmaker() as s:
        return int(s.execute(select(func.count()).select_from(Instance)
                             .where(Instance.sop_instance_uid.in_(uids))).scalar_one())


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the node closes ``sock`` (reads and drops what it sends), None if it stays open."""
    t0 = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() - t0 < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


# --------------------------------------------------------------------------- tests
def test_huge_associate_rq_is_aborted_after_its_header(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer declaring a 4 GiB A-ASSOCIATE-RQ gets A-ABORT (invalid PDU
    parameter value) after the 6-byte header; nothing of the stream is kept,
    and a real sender is served meanwhile."""
    study, files = legit_study(tmp_path)
    with running(tmp_path, sqlite_url) as (node, server), caplog.at_level(logging.WARNING, "pacs_node"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(ATTACKER, 0)) as s:
            s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
            assert read_pdu(s) == ABORT_INVALID
            assert wait_closed(s, 5) is not None
        assert "declares 4294967295 bytes (dicom.max_associate_rq_bytes = 65536): A-ABORT" in caplog.text

        # The attack: header, then 600 MiB streamed at once.
        peak = RssPeak()
        sent: list[int] = []

        def attack() -> None:
            chunk = b"\x00" * MIB
            n = 0
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                              source_address=(ATTACKER, 0)) as a:
                    a.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
                    for _ in range(600):
                        a.sendall(chunk)
                        n += 1
            except OSError:
                pass
            sent.append(n)

        t = threading.Thread(target=attack)
        t.start()
        proc = storescu(server.port, files)
        out, _ = proc.communicate(timeout=60)
        t.join(60)
        growth = peak.growth()
        assert proc.returncode == 0, out
        assert stored(node, study) == 3
        assert sent and sent[0] < 100, f"the node took {sent[0]} MiB of a 4 GiB request before cutting it off"
        assert growth < 100, f"resident memory grew by {growth:.0f} MB"


def test_oversize_pdata_pdu_is_aborted_after_its_header(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During an association a P-DATA-TF longer than the Maximum Length the
    node announced (dicom.max_pdu_size) gets A-ABORT before any of it is read."""
    study, files = legit_study(tmp_path)
    with running(tmp_path, sqlite_url, max_pdu_size=65536) as (node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        peak = RssPeak()
        sent: list[int] = []
        replies: list[bytes] = []

        def attack() -> None:
            n = 0
            with raw_association(server.port) as a:
                a.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30))
                replies.append(read_pdu(a))
                chunk = b"\x00" * MIB
                try:
                    for _ in range(300):
                        a.sendall(chunk)
                        n += 1
                except OSError:
                    pass
            sent.append(n)

        t = threading.Thread(target=attack)
        t.start()
        proc = storescu(server.port, files)
        out, _ = proc.communicate(timeout=60)
        t.join(60)
        growth = peak.growth()
        assert proc.returncode == 0, out
        assert stored(node, study) == 3
        assert replies == [ABORT_INVALID]
        assert sent and sent[0] < 100
        assert growth < 100, f"resident memory grew by {growth:.0f} MB"
        assert "declares 1073741824 bytes, more than the maximum length 65536 (dicom.max_pdu_size)" in caplog.text
        # The same peer keeps being served by the rules: a proper association works.
        ae = AE(ae_title="ATTACKER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE", bind_address=(ATTACKER, 0))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()


@pytest.mark.parametrize(
    ("kind", "data", "reply"),
    [
        ("p-data first", struct.pack(">BBL", 0x04, 0, 12) + struct.pack(">LBB", 6, 1, 0x03) + b"\x00" * 6,
         b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"),
        ("release first", struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4, b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"),
        ("unknown type", struct.pack(">BBL", 0x99, 0, 16) + b"\x00" * 16, b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x01"),
        ("short request", struct.pack(">BBL", 0x01, 0, 10) + b"\x00" * 10, ABORT_INVALID),
        ("undecodable items", None, ABORT_INVALID),
        ("abort first", struct.pack(">BBL", 0x07, 0, 4) + b"\x00\x00\x00\x00", b""),
    ],
)
def test_bad_first_pdus_get_a_specific_abort(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture, kind: str, data: bytes | None, reply: bytes
) -> None:
    if data is None:
        fixed = struct.pack(">HH", 1, 0) + b"PACSNODE".ljust(16) + b"FUZZER".ljust(16) + b"\x00" * 32
        items = struct.pack(">BBH", 0x99, 0, 5) + b"abcde"
        data = struct.pack(">BBL", 0x01, 0, len(fixed) + len(items)) + fixed + items
    with running(tmp_path, sqlite_url) as (_node, server), caplog.at_level(logging.WARNING, "pacs_node"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(data)
            assert read_pdu(s) == reply, kind
            assert wait_closed(s, 5) is not None
        if reply:
            assert "A-ABORT" in caplog.text
        assert "Traceback" not in caplog.text
        echo = subprocess.run([require_tool("echoscu"), "-aec", "PACSNODE", "127.0.0.1", str(server.port)],
                              capture_output=True, text=True, timeout=30, env=NODELAY_ENV)
        assert echo.returncode == 0, echo.stderr


def test_pre_association_timeout_closes_silent_and_slow_connections(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with running(tmp_path, sqlite_url, pre_association_timeout="1", acse_timeout="30") as (_node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        t0 = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        slow.sendall(rq_bytes()[:20])  # header and part of the body, then nothing
        closed = []
        for s in (silent, slow):
            assert wait_closed(s, 10) is not None
            closed.append(time.monotonic() - t0)
        silent.close()
        slow.close()
        assert all(0.9 < c < 3 for c in closed), closed
        assert "no A-ASSOCIATE-RQ from 127.0.0.1" in caplog.text
        assert "A-ASSOCIATE-RQ from 127.0.0.1" in caplog.text and "not complete within 1.0 s" in caplog.text
        assert server.guard.pending() == 0 and server.guard.connections("127.0.0.1") == 0


def test_idle_sockets_from_one_address_do_not_lock_out_the_archive(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """16 silent connections from one address, reopened as soon as the node
    closes them, while another address stores a study; afterwards the same
    address associates again."""
    study, files = legit_study(tmp_path)
    with running(tmp_path, sqlite_url, pre_association_timeout="1.5") as (node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        stop = threading.Event()
        closed_after: list[float] = []

        def idle(reconnect_until: float) -> None:
            socks = {socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(ATTACKER, 0)):
                     time.monotonic() for _ in range(16)}
            for s in socks:
                s.setblocking(False)
            while socks and not stop.is_set():
                for s, opened in list(socks.items()):
                    try:
                        if s.recv(4096) != b"":
                            continue  # an A-ASSOCIATE-RJ / A-ABORT: wait for the close
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    closed_after.append(time.monotonic() - opened)
                    s.close()
                    del socks[s]
                    if time.monotonic() < reconnect_until:
                        try:
                            r = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                                         source_address=(ATTACKER, 0))
                            r.setblocking(False)
                            socks[r] = time.monotonic()
                        except OSError:
                            pass
                time.sleep(0.02)
            for s in socks:
                s.close()

        t = threading.Thread(target=idle, args=(time.monotonic() + 3.0,))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        proc = storescu(server.port, files)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        t.join(20)
        stop.set()
        assert proc.returncode == 0, out
        assert stored(node, study) == 3
        assert took < 5, f"the legitimate sender waited {took:.1f} s"
        assert len(closed_after) >= 16 and max(closed_after) < 3, closed_after
        assert "dicom.max_connections_per_peer = 4" in caplog.text
        # The attacker's address is not banned: a proper association works now.
        ae = AE(ae_title="ATTACKER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE", bind_address=(ATTACKER, 0))
        assert assoc.is_established
        assoc.release()


def test_per_peer_limit_rejects_extra_associations_with_local_limit_exceeded(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with running(tmp_path, sqlite_url, max_connections_per_peer="2") as (_node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        ae = AE(ae_title="IDLER")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", server.port, ae_title="PACSNODE", bind_address=(ATTACKER, 0))
                for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE", bind_address=(ATTACKER, 0))
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert rj is not None and (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert "gets A-ASSOCIATE-RJ local-limit-exceeded" in caplog.text
        assert "2 connections already open from this address (dicom.max_connections_per_peer = 2)" in caplog.text
        other = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE")  # another address
        assert other.is_established
        other.release()
        held[0].release()
        deadline = time.monotonic() + 5
        while server.guard.connections(ATTACKER) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        again = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE", bind_address=(ATTACKER, 0))
        assert again.is_established
        for a in (again, held[1]):
            a.release()


def test_instance_larger_than_max_is_refused_and_the_association_goes_on(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Above dicom.max_instance_bytes the rest of the data set is read and
    dropped (memory and disk stay flat) and the C-STORE gets 0xA700; the
    sender's next instance on the same association is stored."""
    study, files = legit_study(tmp_path)
    with running(tmp_path, sqlite_url, max_instance_bytes=str(8 * MIB)) as (node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        big = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
        big.add_new(0x00091010, "OB", b"\x00" * (12 * MIB))  # private element
        small = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(big.SOPClassUID, [str(big.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE")
        assert assoc.is_established
        rsp = assoc.send_c_store(big)
        assert rsp.Status == 0xA700
        assert str(rsp.ErrorComment) == f"instance exceeds dicom.max_instance_bytes ({8 * MIB})"
        assert assoc.send_c_store(small).Status == 0x0000
        assoc.release()
        del big
        assert stored(node, [small]) == 1
        assert "exceeds 8388608 bytes (dicom.max_instance_bytes)" in caplog.text

        # 160 MiB streamed by dcmtk while another sender stores a study.
        huge = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
        huge.add_new(0x00091010, "OB", b"\x00" * (160 * MIB))
        huge_file = write_files([huge], tmp_path / "huge")[0]
        huge_study = str(huge.StudyInstanceUID)
        del huge
        peak = RssPeak()
        attacker = storescu(server.port, [huge_file], "BIGSENDER", "-v")
        time.sleep(0.2)
        proc = storescu(server.port, files)
        out, _ = proc.communicate(timeout=60)
        big_out, _ = attacker.communicate(timeout=120)
        growth = peak.growth()
        assert proc.returncode == 0, out
        assert stored(node, study) == 3
        assert attacker.returncode != 0 and "Refused: OutOfResources" in big_out, big_out
        assert growth < 100, f"resident memory grew by {growth:.0f} MB"
        assert not (node.store.root / huge_study).exists()
        assert [p for p in node.store.root.iterdir() if p.is_file()] == []  # no spool or temporary file left


def test_large_instance_below_the_limit_is_spooled_to_disk_and_stored(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacs_node.ingest import spool

    files_made: list[Any] = []
    real = spool.tempfile.TemporaryFile

    def counting(*a: Any, **k: Any) -> Any:
        f = real(*a, **k)
        files_made.append(k.get("dir"))
        return f

    monkeypatch.setattr(spool.tempfile, "TemporaryFile", counting)
    with running(tmp_path, sqlite_url, max_instance_bytes=str(64 * MIB)) as (node, server):
        ds = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
        ds.add_new(0x00091010, "OB", bytes(range(256)) * (24 * MIB // 256))
        path = write_files([ds], tmp_path / "big")[0]
        proc = storescu(server.port, [path])
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert files_made == [node.store.root]
        from pydicom import dcmread

        got = dcmread(node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
        assert got[0x00091010].value == ds[0x00091010].value


def test_oversized_command_set_and_pipelining_abort_the_association(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(tmp_path, sqlite_url) as (node, server), caplog.at_level(logging.WARNING, "pacs_node"):
        # Command fragments (never the last one) past 64 KiB.
        with raw_association(server.port) as a:
            fragment = b"\x00" * 16000
            pdv = struct.pack(">LBB", len(fragment) + 2, 1, 0x01) + fragment
            for _ in range(5):  # the fifth passes 64 KiB
                a.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
            assert read_pdu(a) == ABORT_INVALID
        assert "a command set larger than 65536 bytes" in caplog.text

        # Requests sent without waiting for the responses, against a slow handler.
        real_ingest = node.ingestor.ingest

        def slow(*args: Any, **kw: Any) -> Any:
            time.sleep(1.0)
            return real_ingest(*args, **kw)

        monkeypatch.setattr(node.ingestor, "ingest", slow)
        study = make_study(n_series=1, per_series=5)
        with raw_association(server.port) as a:
            for i, ds in enumerate(study):
                a.sendall(c_store_pdus(ds, msg_id=i + 1))
            pdus = [read_pdu(a, timeout=10) for _ in range(6)]
        assert ABORT_INVALID in pdus, pdus
        assert "requests waiting for a response" in caplog.text


def test_a_pdu_must_arrive_within_the_network_timeout(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with running(tmp_path, sqlite_url, network_timeout="1") as (_node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        with raw_association(server.port) as a:
            a.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
            t0 = time.monotonic()
            assert read_pdu(a, timeout=10) == ABORT_INVALID
            assert time.monotonic() - t0 < 3
        assert "not complete within 1 s (dicom.network_timeout): A-ABORT" in caplog.text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_pdu_size", "0", "must be 4096-67108864 bytes"),
        ("max_associate_rq_bytes", "100", "greater than or equal to 1024"),
        ("pre_association_timeout", "0", "greater than 0"),
        ("tls_port", "2762", "tls_key, tls_ca and tls_port need tls_cert"),
    ],
)
def test_limit_keys_are_validated(tmp_path: Path, sqlite_url: str, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_settings(tmp_path, sqlite_url, **{f"dicom__{key}": value})


def test_max_associations_counts_only_associations(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Silent connections do not use association slots; past max_associations
    a request gets A-ASSOCIATE-RJ local-limit-exceeded, logged with the key."""
    with running(tmp_path, sqlite_url, max_associations="2", max_connections_per_peer="0") as (_node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(6)]
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", server.port, ae_title="PACSNODE") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", server.port, ae_title="PACSNODE")
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert rj is not None and (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert "local limit exceeded (dicom.max_associations = 2)" in caplog.text
        assert server.guard.pending() == 6
        for a in held:
            a.release()
        for s in silent:
            s.close()


@pytest.mark.parametrize(("field", "reason"), [("called", 0x07), ("calling", 0x03)])
def test_regression_non_ascii_ae_title_is_rejected_before_pynetdicom_logs_a_traceback(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture, field: str, reason: int
) -> None:
    """Fuzz campaign seed 20261204, garbage PDUs: an A-ASSOCIATE-RQ whose AE
    title holds bytes like 0xC8 made pynetdicom log a UnicodeDecodeError at
    ERROR with a traceback. The node answers A-ASSOCIATE-RJ (permanent,
    service-user, called/calling AE title not recognised) itself."""
    pdu = bytearray(rq_bytes())
    at = 10 if field == "called" else 26
    pdu[at : at + 4] = b"\xc8\xba\xcf\xfd"
    with running(tmp_path, sqlite_url) as (_node, server), caplog.at_level(logging.DEBUG):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(bytes(pdu))
            reply = read_pdu(s)
        assert reply[:1] == b"\x03" and reply[7:10] == bytes([0x01, 0x01, reason]), reply.hex()
        assert f"the {field} AE title has characters AE does not allow" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
