"""Cut arrivals never make a study complete: an aborted association, a sender
killed mid-send, the node killed with SIGKILL mid-association, a STOW-RS
request cut by its client or truncated, a failed pull. Each leaves the study
interrupted (not analysed after ``stable_seconds`` nor ``force_complete``)
until a complete resend, source verification or an operator. Real pynetdicom
peers, a real ``pacs-node serve`` process, real SQLite / PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select

from dicom_factory import make_study, to_bytes, write_files
from nodetest import TEST_AUTH, TEST_TOKEN, free_port
from pacs_node.api.app import create_app
from pacs_node.assemble.scheduler import StudyAssembler
from pacs_node.config import StudySettings
from pacs_node.db.models import Arrival, Job, JobEvent, Study
from pacs_node.db.session import Database
from pacs_node.ingest.dimse import DimseServer
from pacs_node.ingest.recorder import Ingestor, parse_meta
from pacs_node.jobs.actions import analyze_study
from pacs_node.jobs.routing import RoutingRule
from pacs_node.node import Node
from pacs_node.pull.base import SourceListing, SourceUnavailableError
from pacs_node.pull.completeness import CompletenessChecker
from pacs_node.pull.settings import load_sources
from test_cli_serve import NodeProcess, cli

T = TypeVar("T")
STABLE = StudySettings(stable_seconds=0.3, force_complete_seconds=0.6, scheduler_interval_seconds=0.05)
BOUNDARY = "arrival-test-boundary"
CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


# ---------------------------------------------------------------- helpers
def wait_for(fn: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def study_row(db: Database) -> Study | None:
    with db.sessionmaker() as s:
        return s.execute(select(Study)).scalar_one_or_none()


def arrivals(db: Database) -> list[tuple[str, str | None, int]]:
    with db.sessionmaker() as s:
        return [(a.source, a.outcome, a.instance_count)
                for a in s.execute(select(Arrival).order_by(Arrival.id)).scalars()]


def jobs(db: Database) -> list[Job]:
    with db.sessionmaker() as s:
        return list(s.execute(select(Job).order_by(Job.id)).scalars())


def interrupted(db: Database) -> str | None:
    st = study_row(db)
    return st.interrupted_reason if st is not None and st.interrupted_at is not None else None


def associate(port: int, study: list[Dataset], calling: str = "SENDER") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(study[0].SOPClassUID, study[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    return assoc


def send(assoc: Any, datasets: list[Dataset]) -> None:
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000


def ingest(ingestor: Ingestor, datasets: list[Dataset], arrival: str | None = None, source: str = "dimse") -> None:
    for ds in datasets:
        data = to_bytes(ds)
        ingestor.ingest(data, parse_meta(data), source=source, calling_aet="ARCHIVE", arrival=arrival)


def cut_arrival(node: Node, datasets: list[Dataset], outcome: str = "aborted") -> None:
    key = node.ingestor.arrivals.new_key("dimse")
    ingest(node.ingestor, datasets, key)
    node.ingestor.arrivals.close(key, outcome)
    assert interrupted(node.db) == outcome


@pytest.fixture
def scp(node: Node) -> Iterator[DimseServer]:
    server = DimseServer(node.settings.dicom, node.ingestor)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- DIMSE
def test_aborted_association_waits_for_a_complete_resend(node: Node, scp: DimseServer) -> None:
    study = make_study(2, 3)
    asm = StudyAssembler(node.db, STABLE)
    assoc = associate(scp.port, study)
    send(assoc, study[:3])
    assoc.abort()
    assert wait_for(lambda: interrupted(node.db), what="interruption") == "aborted"
    assert arrivals(node.db) == [("dimse", "aborted", 3)]
    time.sleep(0.7)  # past stable_seconds and force_complete_seconds
    assert asm.tick() == [] and jobs(node.db) == []

    # A complete resend (duplicates included) on a new association, released.
    assoc = associate(scp.port, study)
    send(assoc, study)
    assoc.release()
    wait_for(lambda: interrupted(node.db) is None, what="interruption cleared")
    assert arrivals(node.db) == [("dimse", "aborted", 3), ("dimse", "released", 6)]
    time.sleep(0.35)
    (job_id,) = asm.tick()
    (job,) = jobs(node.db)
    assert job.id == job_id and job.instance_count == 6 and job.reason == "study stable for 0.3 s"


def test_sender_killed_mid_send_interrupts_the_study(node: Node, scp: DimseServer, tmp_path: Path) -> None:
    """A lost connection: the sending process dies (no A-RELEASE, no A-ABORT)."""
    study = make_study(1, 6)
    files = write_files(study, tmp_path / "in")
    script = (
        "import sys, time\nfrom pydicom import dcmread\nfrom pynetdicom import AE\n"
        "files = sys.argv[2:]\nds0 = dcmread(files[0])\nae = AE(ae_title='SENDER')\n"
        "ae.add_requested_context(ds0.SOPClassUID, ds0.file_meta.TransferSyntaxUID)\n"
        "a = ae.associate('127.0.0.1', int(sys.argv[1]), ae_title='PACSNODE')\n"
        "for f in files[:3]:\n    assert a.send_c_store(dcmread(f)).Status == 0\n"
        "print('sent', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(scp.port), *map(str, files)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        proc.kill()
    finally:
        proc.wait(timeout=10)
    assert wait_for(lambda: interrupted(node.db), what="interruption") in ("aborted", "lost")
    time.sleep(0.7)
    assert StudyAssembler(node.db, STABLE).tick() == []


def test_open_association_does_not_hold_a_quiet_study(node: Node, scp: DimseServer) -> None:
    """Decision: quiet for stable_seconds is complete even while the sender
    keeps its association open (an abort afterwards finds the version claimed)."""
    study = make_study(1, 3)
    assoc = associate(scp.port, study)
    send(assoc, study)
    time.sleep(0.35)
    assert len(StudyAssembler(node.db, STABLE).tick()) == 1
    assoc.abort()
    wait_for(lambda: arrivals(node.db) == [("dimse", "aborted", 3)], what="arrival closed")
    assert interrupted(node.db) is None  # nothing pending to hold


def _serve_config(tmp_path: Path, db_url: str, dicom_port: int, http_port: int) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[dicom]
port = {dicom_port}
[http]
port = {http_port}
[storage]
root = "{tmp_path / 'storage'}"
min_free_bytes = 0
reconcile_grace_seconds = 0
[database]
url = "{db_url}"
[queue]
start_worker = false
[study]
stable_seconds = 0.5
force_complete_seconds = 1.0
scheduler_interval_seconds = 0.1
""")
    if not db_url.startswith("sqlite"):
        assert cli(cfg, "db", "upgrade").returncode == 0
    return cfg


def test_node_killed_mid_association_marks_the_study_interrupted(tmp_path: Path, db_url: str) -> None:
    dicom_port, http_port = free_port(), free_port()
    cfg = _serve_config(tmp_path, db_url, dicom_port, http_port)
    db = Database(db_url)
    node = NodeProcess(cfg, tmp_path / "node.log")
    node.start(dicom_port, http_port)
    try:
        study = make_study(2, 3)
        assoc = associate(dicom_port, study)
        send(assoc, study[:3])
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=10)
        assoc.abort()
        # SIGKILL gives no event: the arrival is still open, durably.
        assert arrivals(db) == [("dimse", None, 3)] and interrupted(db) is None and jobs(db) == []

        node.start(dicom_port, http_port)
        assert interrupted(db) == "crashed" and arrivals(db) == [("dimse", "crashed", 3)]
        time.sleep(1.5)  # the running node's assembler: past stable and force_complete
        assert jobs(db) == []
        listed = json.loads(cli(cfg, "studies", "list", "--json").stdout)
        assert [s["interrupted_reason"] for s in listed] == ["crashed"]
        assert "marked interrupted" in (tmp_path / "node.log").read_text()

        assoc = associate(dicom_port, study)
        send(assoc, study)
        assoc.release()
        (job,) = wait_for(lambda: jobs(db), what="job after the complete resend")
        assert job.instance_count == 6 and interrupted(db) is None
    finally:
        db.dispose()
        if node.proc is not None and node.proc.poll() is None:
            node.stop()


# ---------------------------------------------------------------- STOW-RS
def _body(datasets: list[Dataset], *, close: bool = True) -> bytes:
    out = bytearray()
    for ds in datasets:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds) + b"\r\n"
    if close:
        out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def test_stow_request_cut_by_the_client_interrupts_the_study(node: Node) -> None:
    study = make_study(1, 4)
    full = _body(study)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="uvicorn")
        cut = len(_body(study[:2])) + 200  # two whole parts, then part of the third
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CT}\r\n"
                         f"Authorization: Bearer {TEST_TOKEN}\r\n"
                         f"Content-Length: {len(full)}\r\n\r\n".encode() + full[:cut])
            wait_for(lambda: len(arrivals(node.db)) == 1, what="the first parts stored")
        assert wait_for(lambda: interrupted(node.db), what="interruption") == "aborted"
        assert arrivals(node.db) == [("stowrs", "aborted", 2)]
        time.sleep(0.7)
        assert StudyAssembler(node.db, STABLE).tick() == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_truncated_stow_body_interrupts_and_a_full_request_clears(node: Node) -> None:
    study = make_study(1, 3)
    asm = StudyAssembler(node.db, STABLE)
    with TestClient(create_app(node), headers=TEST_AUTH) as client:
        truncated = _body(study[:2], close=False) + f"--{BOUNDARY}\r\n\r\ntrunc".encode()
        r = client.post("/dicomweb/studies", content=truncated, headers={"Content-Type": CT})
        assert r.status_code == 202  # two stored, the truncated rest listed as failed
        assert interrupted(node.db) == "aborted"
        time.sleep(0.7)
        assert asm.tick() == []
        r = client.post("/dicomweb/studies", content=_body(study), headers={"Content-Type": CT})
        assert r.status_code == 200
    assert interrupted(node.db) is None
    assert arrivals(node.db) == [("stowrs", "aborted", 2), ("stowrs", "released", 3)]
    time.sleep(0.35)
    assert len(asm.tick()) == 1


# ---------------------------------------------------------------- pull, gate, operator, recovery
def test_failed_pull_interrupts_and_a_complete_pull_clears(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    from pacs_node.pull import dicomweb
    from pacs_node.pull.service import PullService

    study = make_study(1, 4)
    uid = str(study[0].StudyInstanceUID)
    fail_after: list[int | None] = [2]

    def retrieve(src: Any, study_uid: str, sink: Callable[[bytes], int]) -> None:
        for i, ds in enumerate(study):
            if fail_after[0] is not None and i == fail_after[0]:
                raise SourceUnavailableError("connection reset by the archive")
            assert sink(to_bytes(ds)) == 0

    monkeypatch.setattr(dicomweb, "query_study", lambda src, u: SourceListing(u, len(study)))
    monkeypatch.setattr(dicomweb, "retrieve_study", retrieve)
    pulls = PullService(node, load_sources([{"name": "web", "kind": "dicomweb", "url": "http://archive"}]))
    with pytest.raises(SourceUnavailableError):
        pulls.pull("web", uid)
    assert interrupted(node.db) == "aborted" and arrivals(node.db) == [("pull", "aborted", 2)]
    fail_after[0] = None
    assert pulls.pull("web", uid).stored == 2
    assert interrupted(node.db) is None and arrivals(node.db)[-1] == ("pull", "released", 4)


def test_only_a_verified_source_check_releases_an_interrupted_study(node: Node) -> None:
    study = make_study(1, 5)
    listing = SourceListing(str(study[0].StudyInstanceUID), 5, {str(d.SOPInstanceUID): str(d.SOPClassUID)
                                                                for d in study})
    (src,) = load_sources([{"name": "archive", "kind": "dicomweb", "url": "http://archive",
                            "calling_aets": ["ARCHIVE"], "verify_completeness": True,
                            "completeness_timeout_seconds": 0.1, "completeness_poll_seconds": 0.001}])
    checker = CompletenessChecker(node.db, [src], STABLE.stable_seconds, lister=lambda s, u: listing)
    asm = StudyAssembler(node.db, STABLE, completeness=checker)
    try:
        cut_arrival(node, study[:3])
        time.sleep(0.7)  # stable, past force_complete and the check's time-out
        assert asm.tick() == [] and asm.tick() == []  # 3 of 5: the time-out does not proceed unverified
        ingest(node.ingestor, study[3:])  # the rest, by an arrival the node cannot see end (no key)
        assert interrupted(node.db) == "aborted"
        time.sleep(0.35)
        (job_id,) = asm.tick()
    finally:
        checker.close()
    (job,) = jobs(node.db)
    assert job.reason == "interrupted arrival (aborted); verified complete against source archive (5 instances)"
    assert interrupted(node.db) is None


def test_operator_analyses_an_interrupted_study(node: Node) -> None:
    class Dispatcher:
        def __init__(self) -> None:
            self.process: list[int] = []

        def enqueue_process(self, job_id: int) -> None:
            self.process.append(job_id)

        def enqueue_delivery(self, job_id: int) -> None:
            raise AssertionError("no delivery")

    study = make_study(1, 4)
    cut_arrival(node, study[:3], "lost")
    dispatcher = Dispatcher()
    job_id = analyze_study(node.db, dispatcher, str(study[0].StudyInstanceUID), [RoutingRule()])
    assert dispatcher.process == [job_id] and interrupted(node.db) is None
    with node.db.sessionmaker() as s:
        first = s.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars().first()
    assert first is not None and "its last arrival was interrupted (lost)" in (first.message or "")


def test_startup_closes_only_the_arrivals_of_processes_that_are_gone(node: Node) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        owners = {"gone": dead.pid, "beside": alive.pid}
        for name, pid in owners.items():
            other = Ingestor(node.db, node.store)
            other.arrivals.pid, other.arrivals.process = pid, f"{name}-process"
            ingest(other, make_study(1, 2), other.arrivals.new_key("pull"), source="pull")
        ingest(node.ingestor, make_study(1, 1), node.ingestor.arrivals.new_key("dimse"))  # this process, open
        settled = node.ingestor.arrivals.recover()
    finally:
        alive.kill()
        alive.wait()
    assert [(s.outcome, s.effect, s.instances) for s in settled] == [("crashed", "interrupted", 2)]
    assert sorted(o or "open" for _, o, _ in arrivals(node.db)) == ["crashed", "open", "open"]
    with node.db.sessionmaker() as s:
        reasons = sorted(x or "" for x in s.execute(select(Study.interrupted_reason)).scalars())
    assert reasons == ["", "", "crashed"]


def test_migration_0004_keeps_existing_studies(db_url: str) -> None:
    from alembic import command
    from sqlalchemy import inspect, text

    from pacs_node.db.migrate import alembic_config, upgrade

    db = Database(db_url)
    try:
        upgrade(db, "0003")
        with db.engine.begin() as c:
            c.execute(text("INSERT INTO studies (id, study_instance_uid, first_received_at, last_received_at, "
                           "version_started_at, version, job_version, num_instances) VALUES "
                           "(1, '1.2.3', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1, 1, 4)"))
            c.execute(text("INSERT INTO jobs (id, study_id, study_version, state, instance_count, series_count, "
                           "attempts, created_at, updated_at, timings, findings) VALUES "
                           "(1, 1, 1, 'done', 4, 1, 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, '{}', '{}')"))
        upgrade(db, "0004")
        with db.engine.connect() as c:
            assert c.execute(text("SELECT study_instance_uid, interrupted_at FROM studies")).one() == ("1.2.3", None)
            assert c.execute(text("SELECT job_id, study_instance_uid FROM job_status")).one() == (1, "1.2.3")
        assert "arrivals" in inspect(db.engine).get_table_names()
        cfg = alembic_config(db.url.render_as_string(hide_password=False))
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0003")
        assert "arrivals" not in inspect(db.engine).get_table_names()
        with db.engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM job_status")).scalar_one() == 1
    finally:
        db.dispose()
