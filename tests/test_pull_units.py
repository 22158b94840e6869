"""Pull mode and the archive completeness check without a real archive:
``[[sources]]`` validation, the completeness gate in the assembler (fake
source listings, real databases), the DICOMweb client against a scripted HTTP
server (204 / 401 / 406 / malformed answers), C-GET context choice, and the
``pacs-node analyze`` exit codes. Against a real Orthanc: ``tests/orthanc/``."""

from __future__ import annotations

import datetime as dt
import json
import threading
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_factory import make_study, to_bytes
from nodetest import free_port, make_settings
from pacs_node.assemble.scheduler import CompletenessResult, StudyAssembler
from pacs_node.config import ConfigError, StudySettings
from pacs_node.db.models import Job, Output, utcnow
from pacs_node.ingest.recorder import parse_meta
from pacs_node.node import Node
from pacs_node.pull import dicomweb
from pacs_node.pull.base import (
    PullReport,
    SourceError,
    SourceListing,
    SourceUnavailableError,
    StudyNotOnSourceError,
    ingest_pulled,
)
from pacs_node.pull.completeness import CompletenessChecker
from pacs_node.pull.dimse import MAX_CONTEXTS, storage_contexts
from pacs_node.pull.settings import SourceSettings, load_sources

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


# ---------------------------------------------------------------- settings
def test_sources_validate_with_one_line_errors() -> None:
    (web, pacs) = load_sources([
        {"name": "web", "kind": "dicomweb", "url": "https://pacs.example.org/dicom-web/"},
        {"name": "pacs", "kind": "dimse", "host": "pacs", "port": 4242, "ae_title": "PACS", "retrieve": "c-move",
         "calling_aets": ["PACS"], "verify_completeness": True},
    ], "MYNODE")
    assert web.url == "https://pacs.example.org/dicom-web" and web.kind == "dicomweb"
    assert (pacs.calling_ae_title, pacs.move_destination, pacs.completeness_timeout_seconds) == ("MYNODE", "MYNODE", 120)
    bad = {
        "sources[a]: a dimse source needs host": {"name": "a", "kind": "dimse", "ae_title": "X"},
        "sources[a]: a dimse source needs ae_title": {"name": "a", "kind": "dimse", "host": "h"},
        "sources[a]: a dicomweb source needs url": {"name": "a", "kind": "dicomweb", "url": "ftp://x"},
        "sources[a].retrieve:": {"name": "a", "kind": "dimse", "host": "h", "ae_title": "X", "retrieve": "c-fetch"},
        "sources[a].calling_aets: must be 1-16": {"name": "a", "kind": "dicomweb", "url": "http://x",
                                                     "calling_aets": ["A" * 17]},
        "sources[a].colour: unknown key": {"name": "a", "kind": "dicomweb", "url": "http://x", "colour": 1},
        "sources[a b].name: must be 1-64": {"name": "a b", "kind": "smb"},
    }
    for message, table in bad.items():
        with pytest.raises(ValueError) as err:
            load_sources([table])
        assert str(err.value).startswith(f"invalid configuration: {message}"), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="duplicate name 'x'"):
        load_sources([{"name": "x", "kind": "dicomweb", "url": "http://a"}] * 2)


def test_example_config_documents_every_source_key() -> None:
    text = EXAMPLE.read_text()
    for key in SourceSettings.model_fields:
        assert f"# {key} =" in text, f"sources.{key} undocumented in config.example.toml"
    # The commented example tables are valid once uncommented.
    block = text[text.index("# [[sources]]"):]
    lines = [line[2:] if line.startswith("# ") else "" for line in block.splitlines()]
    sources = tomllib.loads("\n".join(lines))["sources"]
    assert [s.name for s in load_sources(sources)] == ["pacs", "web-archive"]


def test_serve_refuses_invalid_sources(tmp_path: Path, sqlite_url: str) -> None:
    from pacs_node.serve import NodeServer

    settings = make_settings(tmp_path, sqlite_url, sources='[{"name": "x", "kind": "dimse"}]')
    node = Node.from_settings(settings, migrate=True)
    try:
        with pytest.raises(ConfigError, match=r"^invalid configuration: sources\[x\]: a dimse source needs host$"):
            NodeServer(node, dispatcher=_NoDispatcher())
    finally:
        node.close()


class _NoDispatcher:
    def enqueue_process(self, job_id: int) -> None:
        raise AssertionError("nothing should be enqueued")

    def enqueue_delivery(self, job_id: int) -> None:
        raise AssertionError("nothing should be enqueued")


# ---------------------------------------------------------------- C-GET contexts
def test_c_get_storage_contexts_fit_in_one_association() -> None:
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    known = storage_contexts({ct, mr})
    # One context per (class, transfer syntax): the archive can send as stored.
    assert all(len(ts) == 1 for _, ts in known) and {c for c, _ in known} == {ct, mr}
    assert len(known) <= MAX_CONTEXTS - 1 and ("1.2.840.10008.1.2.1" in {t[0] for c, t in known if c == ct})
    fallback = storage_contexts(None)
    assert len(fallback) == 120 and all(len(ts) > 2 for _, ts in fallback)
    many = storage_contexts({f"1.2.3.{i}" for i in range(100)})
    assert len(many) == 100 and all(len(ts) > 2 for _, ts in many)
    too_many = storage_contexts({f"1.2.3.{i}" for i in range(200)})
    assert len(too_many) == MAX_CONTEXTS - 1


# ---------------------------------------------------------------- completeness gate
class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.offset)


def _source(**kw: Any) -> SourceSettings:
    base: dict[str, Any] = dict(name="archive", kind="dicomweb", url="http://archive", calling_aets=["ARCHIVE"],
                                verify_completeness=True, completeness_timeout_seconds=60,
                                completeness_poll_seconds=0.001)
    base.update(kw)
    (src,) = load_sources([base])
    return src


def _ingest(node: Node, datasets: list[Any], aet: str = "ARCHIVE") -> None:
    for ds in datasets:
        data = to_bytes(ds)
        node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet=aet)


class FakeArchive:
    """A source listing: the study's SOP UIDs, or an error to raise."""

    def __init__(self, sops: list[str] | None = None, error: Exception | None = None) -> None:
        self.sops = sops or []
        self.error = error
        self.calls = 0

    def __call__(self, src: SourceSettings, study_uid: str) -> SourceListing:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return SourceListing(study_uid, len(self.sops), {s: "1.2.840.10008.5.1.4.1.1.2" for s in self.sops})


def _assembler(node: Node, checker: Callable[..., CompletenessResult], clock: Clock) -> StudyAssembler:
    return StudyAssembler(node.db, StudySettings(stable_seconds=5), clock=clock, completeness=checker)


def _reasons(node: Node) -> list[str]:
    with node.db.sessionmaker() as s:
        return [j.reason or "" for j in s.execute(select(Job).order_by(Job.id)).scalars()]


def test_incomplete_study_waits_then_proceeds_with_a_note(node: Node) -> None:
    study = make_study(2, 5)
    archive = FakeArchive([str(d.SOPInstanceUID) for d in study])
    clock = Clock()
    checker = CompletenessChecker(node.db, [_source()], 5, lister=archive, clock=clock)
    asm = _assembler(node, checker, clock)
    _ingest(node, study[:8])
    clock.offset = 6  # stable
    assert asm.tick() == [] and archive.calls == 1
    clock.offset = 30
    assert asm.tick() == []
    clock.offset = 5 + 61  # past completeness_timeout_seconds after the study turned stable
    assert len(asm.tick()) == 1
    assert _reasons(node) == ["study stable for 5 s; proceeded incomplete: 8 of 10 instances after 60 s"]
    checker.close()


def test_complete_study_and_the_nodes_own_outputs(node: Node) -> None:
    """The SEG/SR of an earlier run that the archive now holds are not expected from it."""
    study = make_study(1, 4)
    clock = Clock()
    first = StudyAssembler(node.db, StudySettings(stable_seconds=5), clock=clock)  # no gate
    _ingest(node, study)
    clock.offset = 6
    (job_id,) = first.tick()
    own = [generate_uid(), generate_uid()]
    # A late instance: version 2, checked against the archive, which also
    # holds the node's outputs of job 1.
    late = make_study(1, 1, study_uid=str(study[0].StudyInstanceUID))
    _ingest(node, late)
    archive = FakeArchive([str(d.SOPInstanceUID) for d in study + late] + [str(u) for u in own])
    checker = CompletenessChecker(node.db, [_source()], 5, lister=archive, clock=clock)
    asm = _assembler(node, checker, clock)
    clock.offset = 12
    assert asm.tick() == []  # 2 instances missing...
    with node.db.session() as s:
        for i, sop in enumerate(own):  # ...that are job 1's outputs
            s.add(Output(job_id=job_id, kind=("seg", "sr")[i], sop_class_uid="1.2.3", sop_instance_uid=sop,
                         series_instance_uid=generate_uid(), path=f"{job_id}/{i}.dcm", size_bytes=1,
                         sha256="0" * 64))
    assert len(asm.tick()) == 1
    assert _reasons(node)[-1] == "study stable for 5 s; verified complete against source archive (5 instances)"
    checker.close()


def test_unmapped_sender_unknown_study_and_unreachable_archive(node: Node) -> None:
    clock = Clock()
    # Another AE: not checked at all.
    archive = FakeArchive([])
    checker = CompletenessChecker(node.db, [_source()], 5, lister=archive, clock=clock)
    asm = _assembler(node, checker, clock)
    _ingest(node, make_study(1, 3), aet="MODALITY")
    clock.offset = 6
    assert len(asm.tick()) == 1 and archive.calls == 0
    assert _reasons(node)[-1] == "study stable for 5 s"
    # The archive does not know the study: proceed at once, say so.
    missing = FakeArchive(error=StudyNotOnSourceError("x", "archive"))
    checker2 = CompletenessChecker(node.db, [_source()], 5, lister=missing, clock=clock)
    _ingest(node, make_study(1, 3))
    clock.offset = 12
    assert len(_assembler(node, checker2, clock).tick()) == 1
    assert _reasons(node)[-1] == "study stable for 5 s; completeness not verified: study not found on source archive"
    # Unreachable: wait up to the timeout, then proceed unverified.
    down = FakeArchive(error=SourceUnavailableError("source archive unreachable: no association"))
    checker3 = CompletenessChecker(node.db, [_source()], 5, lister=down, clock=clock)
    asm3 = _assembler(node, checker3, clock)
    _ingest(node, make_study(1, 3))
    clock.offset = 18
    assert asm3.tick() == []
    clock.offset = 18 + 61
    assert len(asm3.tick()) == 1
    assert _reasons(node)[-1] == ("study stable for 5 s; completeness not verified: source archive unreachable: "
                                  "no association after 60 s")
    for c in (checker, checker2, checker3):
        c.close()


def test_archive_is_asked_at_most_every_poll_interval(node: Node) -> None:
    study = make_study(1, 4)
    archive = FakeArchive([str(d.SOPInstanceUID) for d in study] + [generate_uid()])
    clock = Clock()
    checker = CompletenessChecker(node.db, [_source(completeness_poll_seconds=3600)], 5, lister=archive, clock=clock)
    asm = _assembler(node, checker, clock)
    _ingest(node, study)
    clock.offset = 6
    for _ in range(20):
        assert asm.tick() == []
    assert archive.calls == 1
    checker.close()


def test_forced_completion_does_not_wait_for_the_archive(node: Node) -> None:
    clock = Clock()
    calls: list[int] = []

    def never_ready(study: Any) -> CompletenessResult:
        calls.append(study.id)
        return CompletenessResult(False)

    asm = StudyAssembler(node.db, StudySettings(stable_seconds=5, force_complete_seconds=30), clock=clock,
                         completeness=never_ready)
    _ingest(node, make_study(1, 3))
    clock.offset = 6
    assert asm.tick() == [] and len(calls) == 1
    clock.offset = 31
    assert len(asm.tick()) == 1
    assert _reasons(node) == ["forced complete after 30 s (completeness check still waiting)"]


def test_a_failing_gate_does_not_block_analyses(node: Node) -> None:
    def broken(study: Any) -> CompletenessResult:
        raise RuntimeError("bug")

    clock = Clock()
    asm = StudyAssembler(node.db, StudySettings(stable_seconds=5), clock=clock, completeness=broken)
    _ingest(node, make_study(1, 3))
    clock.offset = 6
    assert len(asm.tick()) == 1
    assert _reasons(node) == ["study stable for 5 s; completeness check failed"]


# ---------------------------------------------------------------- DICOMweb client, scripted server
Handler = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, Handler], list[tuple[str, dict[str, str]]]]]:
    routes: dict[str, Handler] = {}
    seen: list[tuple[str, dict[str, str]]] = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append((self.path, dict(self.headers)))
            path = self.path.split("?", 1)[0]
            handler = routes.get(path)
            if handler is None:
                self.send_response(404)
                self.end_headers()
                return
            handler(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", routes, seen
    server.shutdown()


def _reply(status: int, body: bytes = b"", ctype: str = "application/dicom+json") -> Handler:
    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handler


def _multipart(parts: list[bytes], boundary: str = "b0undary") -> bytes:
    out = b""
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_dicomweb_client_statuses(http_server: Any, node: Node) -> None:
    url, routes, seen = http_server
    src = _source(url=url, token="s3cret")
    uid = generate_uid()
    # dcm4chee answers 204 when nothing matches.
    routes["/dicom-web/studies"] = _reply(204)
    with pytest.raises(StudyNotOnSourceError, match=f"study {uid} not found on source archive"):
        dicomweb.query_study(src, uid)
    assert seen[-1][1].get("Authorization") == "Bearer s3cret"
    routes["/dicom-web/studies"] = _reply(401, b"no")
    with pytest.raises(SourceError, match="HTTP 401 .check the source's token"):
        dicomweb.query_study(src, uid)
    routes["/dicom-web/studies"] = _reply(200, b"<html>")
    with pytest.raises(SourceError, match="did not answer JSON"):
        dicomweb.query_study(src, uid)
    routes["/dicom-web/studies"] = _reply(200, json.dumps([{"0020000D": {"vr": "UI", "Value": [uid]},
                                                            "00201208": {"vr": "IS", "Value": [3]}}]).encode())
    assert dicomweb.query_study(src, uid).count == 3

    # WADO-RS: a server refusing transfer-syntax=* is asked again without it.
    study = make_study(1, 3, study_uid=uid)
    body = _multipart([to_bytes(d) for d in study])

    def wado(h: BaseHTTPRequestHandler) -> None:
        if "transfer-syntax=*" in h.headers.get("Accept", ""):
            _reply(406)(h)
        else:
            _reply(200, body, 'multipart/related; type="application/dicom"; boundary=b0undary')(h)

    routes[f"/dicom-web/studies/{uid}"] = wado
    report = PullReport(source="archive", study_uid=uid, method="WADO-RS")
    assert dicomweb.retrieve_study(src, uid, ingest_pulled(node.ingestor, report, uid, calling_aet=None)) == 3
    assert (report.received, report.stored, report.failed) == (3, 3, 0)
    # An instance of another study in the answer is refused, the rest stored.
    stray = make_study(1, 1)
    routes[f"/dicom-web/studies/{uid}"] = _reply(200, _multipart([to_bytes(stray[0]), to_bytes(study[0])]),
                                                 'multipart/related; type="application/dicom"; boundary=b0undary')
    report = PullReport(source="archive", study_uid=uid, method="WADO-RS")
    dicomweb.retrieve_study(src, uid, ingest_pulled(node.ingestor, report, uid, calling_aet=None))
    assert (report.received, report.stored, report.duplicates, report.failed) == (2, 0, 1, 1)
    assert "another study" in report.errors[0]
    routes[f"/dicom-web/studies/{uid}"] = _reply(200, b"--x\r\nbroken", 'multipart/related; boundary=b0undary')
    with pytest.raises(SourceError, match="malformed WADO-RS response"):
        dicomweb.retrieve_study(src, uid, lambda data: 0)
    routes[f"/dicom-web/studies/{uid}"] = _reply(503, b"busy", "text/plain")
    with pytest.raises(SourceError, match="WADO-RS answered HTTP 503: busy"):
        dicomweb.retrieve_study(src, uid, lambda data: 0)


def test_dicomweb_instance_listing_pages(http_server: Any) -> None:
    url, routes, seen = http_server
    uid = generate_uid()
    sops = [generate_uid() for _ in range(dicomweb.PAGE + 5)]

    def listing(h: BaseHTTPRequestHandler) -> None:
        q = dict(p.split("=", 1) for p in h.path.split("?", 1)[1].split("&"))
        start, limit = int(q["offset"]), int(q["limit"])
        items = [{"00080018": {"vr": "UI", "Value": [s]}, "00080016": {"vr": "UI", "Value": ["1.2.3"]}}
                 for s in sops[start:start + limit]]
        _reply(200, json.dumps(items).encode())(h)

    routes[f"/dicom-web/studies/{uid}/instances"] = listing
    got = dicomweb.list_instances(_source(url=url), uid)
    assert got.count == len(sops) and set(got.instances or {}) == set(sops)
    assert len([p for p, _ in seen if "/instances" in p]) == 2


def test_dicomweb_source_unreachable() -> None:
    src = _source(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2)
    with pytest.raises(SourceUnavailableError, match=r"^source archive unreachable \(ConnectError\)"):
        dicomweb.query_study(src, generate_uid())


# ---------------------------------------------------------------- CLI
def test_cli_analyze_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pacs_node.cli import main

    closed = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[storage]
root = "{tmp_path / 'storage'}"
min_free_bytes = 0
[database]
url = "sqlite:///{tmp_path / 'node.db'}"
[[sources]]
name = "down"
kind = "dimse"
host = "127.0.0.1"
port = {closed}
ae_title = "ARCHIVE"
timeout = 2
""")
    uid = generate_uid()
    assert main(["--config", str(cfg), "analyze", uid, "--source", "down"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pacs-node: source down unreachable: no association with ARCHIVE@127.0.0.1:{closed}"]
    assert main(["--config", str(cfg), "analyze", uid, "--source", "other"]) == 1
    assert capsys.readouterr().err.strip() == "pacs-node: unknown source 'other'"
    assert main(["--config", str(cfg), "analyze", uid]) == 1
    assert capsys.readouterr().err.strip() == f"pacs-node: study {uid} is not stored on this node"
    assert main(["--config", str(cfg), "analyze", "1.2.x", "--source", "down"]) == 1
    assert "StudyInstanceUID" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace('host = "127.0.0.1"\n', ""))
    assert main(["--config", str(cfg), "analyze", uid, "--source", "down"]) == 2
    assert capsys.readouterr().err.strip() == "pacs-node: invalid configuration: sources[down]: a dimse source needs host"
