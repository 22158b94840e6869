"""STOW-RS (PS3.18 §10.5): the multipart parser, and the endpoint against real
SQLite / PostgreSQL and real storage, through TestClient and a real uvicorn
server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from nodetest import TEST_AUTH, free_port, make_settings
from dicom_factory import make_instance, make_study, to_bytes
from pacs_node.api.app import create_app
from pacs_node.db.models import Instance
from pacs_node.ingest.multipart import (
    MultipartError,
    MultipartParser,
    iter_parts,
    parse_boundary,
    parse_content_type,
    parse_multipart,
)
from pacs_node.node import Node

BOUNDARY = "pacs-node-test-7d3f"
CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
BASE = "http://testserver/dicomweb"
FAILED, REFERENCED, RETRIEVE_URL = "00081198", "00081199", "00081190"
SOP_CLASS, SOP_INSTANCE, FAILURE_REASON = "00081150", "00081155", "00081197"


# -- helpers -----------------------------------------------------------------


def body_of(parts: list[tuple[bytes, str | None]], boundary: str = BOUNDARY, *, close: bool = True) -> bytes:
    """A multipart/related body; each part is (data, content type or None)."""
    b = boundary.encode()
    out = bytearray(b"preamble to be ignored\r\n")
    for data, ctype in parts:
        out += b"--" + b + b"\r\n"
        if ctype is not None:
            out += b"Content-Type: " + ctype.encode() + b"\r\n"
        out += b"\r\n" + data + b"\r\n"
    if close:
        out += b"--" + b + b"--\r\nepilogue, ignored\r\n"
    return bytes(out)


def dicom_parts(datasets: list[Dataset]) -> list[tuple[bytes, str | None]]:
    return [(to_bytes(ds), "application/dicom") for ds in datasets]


def seq(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = body[tag]
    assert element["vr"] == "SQ"
    items = element["Value"]
    assert isinstance(items, list)
    return items


def value(item: dict[str, Any], tag: str, vr: str) -> Any:
    assert item[tag]["vr"] == vr
    values = item[tag]["Value"]
    assert len(values) == 1
    return values[0]


def instance_url(ds: Dataset, base: str = BASE) -> str:
    return f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def assert_referenced(body: dict[str, Any], datasets: list[Dataset], base: str = BASE) -> None:
    """ReferencedSOPSequence lists exactly ``datasets``, in order, with URLs."""
    items = seq(body, REFERENCED)
    assert len(items) == len(datasets)
    for item, ds in zip(items, datasets):
        assert set(item) == {SOP_CLASS, SOP_INSTANCE, RETRIEVE_URL}
        assert value(item, SOP_CLASS, "UI") == ds.SOPClassUID
        assert value(item, SOP_INSTANCE, "UI") == ds.SOPInstanceUID
        assert value(item, RETRIEVE_URL, "UR") == instance_url(ds, base)


def instances(node: Node) -> dict[str, Instance]:
    with node.db.sessionmaker() as s:
        return {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}


def stored_files(node: Node) -> list[Path]:
    return sorted(p for p in node.store.root.rglob("*") if p.is_file())


def post(client: TestClient, content: bytes, *, study: str | None = None, ctype: str | None = CT) -> httpx.Response:
    url = "/dicomweb/studies" + (f"/{study}" if study else "")
    headers = {"Content-Type": ctype} if ctype is not None else {}
    return client.post(url, content=content, headers=headers)


def dicom_json(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    assert isinstance(body, dict)
    return body


@pytest.fixture
def client(node: Node) -> Iterator[TestClient]:
    with TestClient(create_app(node), headers=TEST_AUTH) as c:
        yield c


# -- multipart parser ----------------------------------------------------------


def test_parser_two_parts_with_preamble_epilogue_and_headers() -> None:
    body = (
        b"this is a preamble\r\n--b1\r\nContent-Type: application/dicom\r\nX-Other:  a\r\n\tfolded\r\n\r\n"
        b"first\r\n--b1  \r\ncontent-type: text/plain; charset=utf-8\r\n\r\n\r\n--b1--\r\nepilogue --b1\r\n"
    )
    parts = parse_multipart(body, b"b1")
    assert [p.data for p in parts] == [b"first", b""]
    assert parts[0].headers == {"content-type": "application/dicom", "x-other": "a folded"}
    assert parts[0].media_type == "application/dicom"
    assert parts[1].media_type == "text/plain"


def test_parser_boundary_like_bytes_inside_data_are_data() -> None:
    data = b"\x00--bnd\r\n--bndX\r\n--bnd-x\r\n \r\n--bn\r\n-bnd--\xff"
    body = b"--bnd\r\n\r\n" + data + b"\r\n--bnd--"
    assert [p.data for p in parse_multipart(body, b"bnd")] == [data]


def test_parser_any_chunking_gives_the_same_parts() -> None:
    payloads = [bytes(range(256)) * 40, b"\r\n--boundX--bound", b"x" * 5000]
    body = b"--bound\r\n" + b"\r\n--bound\r\n".join(b"Content-Type: application/dicom\r\n\r\n" + p for p in payloads)
    body += b"\r\n--bound--\r\n"
    for size in (1, 2, 3, 7, 64, 4096, len(body)):
        parser = MultipartParser(b"bound")
        got = []
        for i in range(0, len(body), size):
            got.extend(parser.feed(body[i : i + size]))
        parser.close()
        assert [p.data for p in got] == payloads, size
        assert parser.complete and parser.parts_seen == 3


def test_parser_tolerates_lf_only_line_ends() -> None:
    body = b"--b\nContent-Type: application/dicom\n\nabc\r\n--b\n\ndef\n--b--\n"
    assert [p.data for p in parse_multipart(body, b"b")] == [b"abc", b"def"]


def test_parser_errors() -> None:
    with pytest.raises(MultipartError, match="empty"):
        parse_multipart(b"", b"b")
    with pytest.raises(MultipartError, match="no multipart delimiter"):
        parse_multipart(b"just some bytes\r\n--other\r\n\r\nx\r\n--other--", b"b")
    with pytest.raises(MultipartError, match="missing close delimiter"):
        parse_multipart(b"--b\r\n\r\ndata without an end", b"b")
    with pytest.raises(MultipartError, match="missing close delimiter"):
        parse_multipart(b"--b\r\n\r\ndata\r\n--b\r\n", b"b")
    with pytest.raises(MultipartError, match="no body parts"):
        parse_multipart(b"--b--\r\n", b"b")
    with pytest.raises(MultipartError, match="malformed part header"):
        parse_multipart(b"--b\r\nnot a header\r\n\r\nx\r\n--b--", b"b")
    with pytest.raises(MultipartError, match="too large"):
        MultipartParser(b"b", max_header_bytes=100).feed(b"--b\r\nX-A: " + b"a" * 200)


def test_content_type_and_boundary_parsing() -> None:
    media, params = parse_content_type('Multipart/Related; TYPE="application/dicom"; boundary="a;b \\"c\\""')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": 'a;b "c"'}
    assert parse_boundary(params) == b'a;b "c"'
    media, params = parse_content_type("multipart/related; type=application/dicom; boundary=xyz")
    assert (media, params["type"], parse_boundary(params)) == ("multipart/related", "application/dicom", b"xyz")
    with pytest.raises(MultipartError, match="no boundary"):
        parse_boundary({})
    with pytest.raises(MultipartError, match="longer than 70"):
        parse_boundary({"boundary": "x" * 71})
    quoted = b'--a;b "c"\r\n\r\npayload\r\n--a;b "c"--\r\n'
    assert [p.data for p in parse_multipart(quoted, b'a;b "c"')] == [b"payload"]


def test_iter_parts_streams_parts_before_the_body_ends() -> None:
    seen: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        seen.append("chunk1")
        yield b"--b\r\n\r\none\r\n--b\r\n"
        seen.append("chunk2")
        yield b"\r\ntwo\r\n--b--"

    async def run() -> None:
        async for part in iter_parts(chunks(), b"b"):
            seen.append(part.data.decode())

    asyncio.run(run())
    assert seen == ["chunk1", "one", "chunk2", "two"]


# -- endpoint ------------------------------------------------------------------


def test_store_two_series_study(node: Node, client: TestClient) -> None:
    study = make_study(n_series=2, per_series=2)
    study_uid = study[0].StudyInstanceUID
    r = post(client, body_of(dicom_parts(study[:3])))
    assert r.status_code == 200, r.text
    body = dicom_json(r)
    assert set(body) == {RETRIEVE_URL, REFERENCED}
    assert value(body, RETRIEVE_URL, "UR") == f"{BASE}/studies/{study_uid}"
    assert_referenced(body, study[:3])

    # The same route with the study in the URL (type parameter unquoted,
    # boundary quoted).
    r = post(
        client,
        body_of(dicom_parts(study[3:])),
        study=study_uid,
        ctype=f'multipart/related; boundary="{BOUNDARY}"; type=application/dicom',
    )
    assert r.status_code == 200, r.text
    assert_referenced(dicom_json(r), study[3:])

    rows = instances(node)
    assert set(rows) == {ds.SOPInstanceUID for ds in study}
    for ds in study:
        path = node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert path.read_bytes() == to_bytes(ds)
        row = rows[ds.SOPInstanceUID]
        assert (row.source, row.calling_aet, row.receive_count) == ("stowrs", None, 1)
        assert row.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert len(stored_files(node)) == 4


def test_type_parameter_may_be_absent_and_part_type_may_be_missing(node: Node, client: TestClient) -> None:
    ds = make_study(n_series=1, per_series=2)
    parts = [(to_bytes(ds[0]), "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"), (to_bytes(ds[1]), None)]
    r = post(client, body_of(parts), ctype=f"multipart/related; boundary={BOUNDARY}")
    assert r.status_code == 200, r.text
    assert_referenced(dicom_json(r), ds)


def test_garbage_part_among_valid_ones(node: Node, client: TestClient) -> None:
    study = make_study(n_series=1, per_series=2)
    parts = dicom_parts(study)
    parts.insert(1, (b"\x00" * 50 + b"definitely not DICOM", "application/dicom"))
    r = post(client, body_of(parts))
    assert r.status_code == 202, r.text
    body = dicom_json(r)
    assert value(body, RETRIEVE_URL, "UR") == f"{BASE}/studies/{study[0].StudyInstanceUID}"
    assert_referenced(body, study)
    assert seq(body, FAILED) == [{FAILURE_REASON: {"vr": "US", "Value": [0xC210]}}]
    assert set(instances(node)) == {ds.SOPInstanceUID for ds in study}


def test_all_parts_bad(node: Node, client: TestClient) -> None:
    ds = make_study(n_series=1, per_series=1)[0]
    parts = [(b"garbage", "application/dicom"), (to_bytes(ds), "text/plain"), (b"more garbage", None)]
    r = post(client, body_of(parts))
    assert r.status_code == 409, r.text
    body = dicom_json(r)
    assert set(body) == {RETRIEVE_URL, FAILED}
    assert body[RETRIEVE_URL] == {"vr": "UR"}  # Type 2, empty: nothing stored
    assert [value(i, FAILURE_REASON, "US") for i in seq(body, FAILED)] == [0xC210, 0xC000, 0xC210]
    assert instances(node) == {} and stored_files(node) == []


def test_study_uid_in_path_must_match(node: Node, client: TestClient) -> None:
    study = make_study(n_series=1, per_series=1)
    other = make_study(n_series=1, per_series=1)
    url_study = study[0].StudyInstanceUID
    r = post(client, body_of(dicom_parts(study + other)), study=url_study)
    assert r.status_code == 202, r.text
    body = dicom_json(r)
    assert_referenced(body, study)
    assert seq(body, FAILED) == [
        {
            SOP_CLASS: {"vr": "UI", "Value": [other[0].SOPClassUID]},
            SOP_INSTANCE: {"vr": "UI", "Value": [other[0].SOPInstanceUID]},
            FAILURE_REASON: {"vr": "US", "Value": [0xA900]},
        }
    ]
    r = post(client, body_of(dicom_parts(other)), study=url_study)
    assert r.status_code == 409, r.text
    assert [value(i, FAILURE_REASON, "US") for i in seq(dicom_json(r), FAILED)] == [0xA900]
    assert set(instances(node)) == {study[0].SOPInstanceUID}

    r = post(client, body_of(dicom_parts(study)), study="1.2.abc")
    assert r.status_code == 400
    assert "not a valid UID" in r.json()["detail"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_crafted_uid_is_refused_and_nothing_escapes_the_root(node: Node, client: TestClient, tmp_path: Path) -> None:
    good = make_study(n_series=1, per_series=1)[0]
    bad = make_instance(study_uid=generate_uid(), series_uid=generate_uid())
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        bad.StudyInstanceUID = "../../etc"
    before = {p for p in tmp_path.parent.rglob("*") if "storage" not in p.parts}
    r = post(client, body_of(dicom_parts([bad])))
    assert r.status_code == 409, r.text
    assert seq(dicom_json(r), FAILED) == [
        {
            SOP_CLASS: {"vr": "UI", "Value": [bad.SOPClassUID]},
            SOP_INSTANCE: {"vr": "UI", "Value": [bad.SOPInstanceUID]},
            FAILURE_REASON: {"vr": "US", "Value": [0xC211]},
        }
    ]
    r = post(client, body_of(dicom_parts([good, bad])))
    assert r.status_code == 202
    assert [value(i, FAILURE_REASON, "US") for i in seq(dicom_json(r), FAILED)] == [0xC211]
    root = node.store.root
    assert stored_files(node) == [root / good.StudyInstanceUID / good.SeriesInstanceUID / f"{good.SOPInstanceUID}.dcm"]
    assert not (node.store.root / "../../etc").exists() and not (tmp_path.parent / "etc").exists()
    after = {p for p in tmp_path.parent.rglob("*") if "storage" not in p.parts}
    assert after - before <= {tmp_path / "node.db-journal", tmp_path / "node.db-wal", tmp_path / "node.db-shm"}
    assert set(instances(node)) == {good.SOPInstanceUID}


def test_duplicate_resend_is_idempotent(node: Node, client: TestClient) -> None:
    study = make_study(n_series=1, per_series=2)
    content = body_of(dicom_parts(study))
    for _ in range(2):
        r = post(client, content)
        assert r.status_code == 200, r.text
        assert_referenced(dicom_json(r), study)
    rows = instances(node)
    assert [rows[ds.SOPInstanceUID].receive_count for ds in study] == [2, 2]
    assert len(stored_files(node)) == 2


UNSUPPORTED = [
    ("application/json", "unsupported Content-Type 'application/json'"),
    (None, "missing Content-Type"),
    ("application/dicom", "unsupported Content-Type 'application/dicom'"),
    (f"multipart/form-data; boundary={BOUNDARY}", "unsupported Content-Type 'multipart/form-data'"),
    (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', "metadata + bulk data"),
    (f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}', "metadata + bulk data"),
    (f'multipart/related; type="image/jpeg"; boundary={BOUNDARY}', "only application/dicom parts"),
]


def test_unsupported_media_type(node: Node, client: TestClient) -> None:
    content = body_of(dicom_parts(make_study(n_series=1, per_series=1)))
    for ctype, message in UNSUPPORTED:
        r = post(client, content, ctype=ctype)
        assert r.status_code == 415, ctype
        assert r.headers["content-type"] == "application/json"
        assert message in r.json()["detail"], ctype
    assert instances(node) == {} and stored_files(node) == []


def test_malformed_multipart(node: Node, client: TestClient) -> None:
    ds = make_study(n_series=1, per_series=1)[0]
    good = body_of(dicom_parts([ds]))
    no_blank_line = good.replace(b"application/dicom\r\n\r\n", b"application/dicom\r\n")
    cases = [
        (good, 'multipart/related; type="application/dicom"', "no boundary"),
        (good, 'multipart/related; type="application/dicom"; boundary=""', "no boundary"),
        (good, 'multipart/related; type="application/dicom"; boundary=other', "no multipart delimiter"),
        (b"", CT, "empty"),
        (f"--{BOUNDARY}--\r\n".encode(), CT, "no body parts"),
        (body_of(dicom_parts([ds]), close=False), CT, "missing close delimiter"),
        (no_blank_line, CT, "malformed part header"),
    ]
    for content, ctype, message in cases:
        r = post(client, content, ctype=ctype)
        assert r.status_code == 400, (message, r.text)
        assert message in r.json()["detail"]
    assert instances(node) == {} and stored_files(node) == []


def test_truncated_body_after_stored_parts_reports_both(node: Node, client: TestClient) -> None:
    study = make_study(n_series=1, per_series=2)
    content = body_of(dicom_parts(study), close=False) + b"--" + BOUNDARY.encode() + b"\r\n\r\ntruncat"
    r = post(client, content)
    assert r.status_code == 202, r.text
    body = dicom_json(r)
    assert_referenced(body, study)
    assert seq(body, FAILED) == [{FAILURE_REASON: {"vr": "US", "Value": [0xC000]}}]


def test_request_too_large(tmp_path: Path, sqlite_url: str) -> None:
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__max_request_bytes=4000), migrate=True)
    try:
        study = make_study(n_series=1, per_series=4)
        content = body_of(dicom_parts(study))
        assert len(content) > 4000 > 2 * (len(to_bytes(study[0])) + 100)
        with TestClient(create_app(node), headers=TEST_AUTH) as client:
            r = post(client, content)
            assert r.status_code == 413
            assert "exceeds http.max_request_bytes" in r.json()["detail"]
        assert instances(node) == {}

        # No Content-Length (chunked, streamed chunk by chunk by the ASGI
        # transport): the limit is enforced while reading, and the instances
        # completed before the limit were stored durably.
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(content), 1000):
                yield content[i : i + 1000]

        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=create_app(node))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=TEST_AUTH) as http:
                return await http.post("/dicomweb/studies", content=chunks(), headers={"Content-Type": CT})

        r = asyncio.run(send())
        assert r.status_code == 413
        assert "content-length" not in r.request.headers
        assert "2 instance(s) received before the limit were stored" in r.json()["detail"]
        assert set(instances(node)) == {ds.SOPInstanceUID for ds in study[:2]}
    finally:
        node.close()


def test_streaming_over_a_real_socket(node: Node) -> None:
    study = make_study(n_series=2, per_series=3, study_uid=generate_uid())
    content = body_of(dicom_parts(study))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

        def chunks() -> Iterator[bytes]:  # chunked transfer, odd sizes
            for i in range(0, len(content), 777):
                yield content[i : i + 777]

        base = f"http://127.0.0.1:{port}/dicomweb"
        with httpx.Client(timeout=30, headers=TEST_AUTH) as http:
            r = http.post(f"{base}/studies/{study[0].StudyInstanceUID}", content=chunks(), headers={"Content-Type": CT})
            assert r.status_code == 200, r.text
            assert r.request.headers.get("transfer-encoding") == "chunked"
            body = dicom_json(r)
            assert value(body, RETRIEVE_URL, "UR") == f"{base}/studies/{study[0].StudyInstanceUID}"
            assert_referenced(body, study, base)
            r = http.post(f"{base}/studies", content=b"{}", headers={"Content-Type": "application/json"})
            assert r.status_code == 415
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
    for ds in study:
        path = node.store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert path.read_bytes() == to_bytes(ds)
    assert set(instances(node)) == {ds.SOPInstanceUID for ds in study}
