"""QIDO-RS and the WADO-RS routes a viewer (OHIF) uses: study retrieve, study /
series / instance metadata with BulkDataURIs, frames (native and as stored)
and bulk data. Real node (SQLite and PostgreSQL), real ingest, real SEG
results under the outputs directory, TestClient, and dicomweb-client against
a real uvicorn server on loopback."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid
from sqlalchemy import select

from api_seed import FakeDispatcher, assemble, build_seg, gradient_series, ingest, save_seg_output
from nodetest import TEST_AUTH, TEST_TOKEN, free_port, make_settings, tokens_env
from pacs_node.api.app import create_app
from pacs_node.db.models import Job, Output
from pacs_node.ingest.multipart import parse_boundary, parse_content_type, parse_multipart
from pacs_node.ingest.recorder import parse_meta
from pacs_node.node import Node

JSON = "application/dicom+json"
STUDY_UID, SERIES_UID, SOP_UID, MODALITIES = "0020000D", "0020000E", "00080018", "00080061"
N_SERIES, N_INSTANCES, N_SERIES_INSTANCES, RETRIEVE_URL = "00201206", "00201208", "00201209", "00081190"
PIXEL_DATA = "7FE00010"
EVRLE = "1.2.840.10008.1.2.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def v(item: dict[str, Any], tag: str) -> Any:
    """The single value of ``tag`` (None when the attribute is empty)."""
    values = item[tag].get("Value")
    if not values:
        return None
    assert len(values) == 1, (tag, values)
    value = values[0]
    return value["Alphabetic"] if isinstance(value, dict) and "Alphabetic" in value else value


def parts(r: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each part of a multipart answer."""
    assert r.status_code == 200, r.text
    media, params = parse_content_type(r.headers["content-type"])
    assert media == "multipart/related"
    return [(p.headers["content-type"], p.data) for p in parse_multipart(r.content, parse_boundary(params))]


def _patient(series: list[Dataset], pid: str, name: str, date: str, accession: str) -> list[Dataset]:
    for ds in series:
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.AccessionNumber = pid, name, date, accession
        ds.PatientSex, ds.StudyTime, ds.ReferringPhysicianName = "F", "083000", "Ref^Doctor"
    return series


@dataclass
class Corpus:
    """Three studies: A (CT, 3 slices, and the node's SEG), B (MR + CT series),
    C (CT, and an SR result row whose file is missing)."""

    node: Node
    a: list[Dataset]
    b_mr: list[Dataset]
    b_ct: list[Dataset]
    c: list[Dataset]
    seg: Dataset
    seg_path: Path


def make_corpus(node: Node) -> Corpus:
    a = _patient(gradient_series(3, 8, 8, modality="CT"), "P-A", "Doe^Jane", "20240105", "ACC-100")
    b_mr = _patient(gradient_series(2, 8, 8, modality="MR"), "P-B", "Roe^Richard", "20240320", "ACC-200")
    b_ct = _patient(gradient_series(2, 8, 8, modality="CT", study_uid=b_mr[0].StudyInstanceUID),
                    "P-B", "Roe^Richard", "20240320", "ACC-200")
    for ds in b_ct:
        ds.SeriesNumber = 2
    c = _patient(gradient_series(1, 8, 8, modality="CT"), "P-C", "Smith^Anna", "20231231", "XYZ-1")
    for series in (a, b_mr, b_ct, c):
        ingest(node, series)
    jobs = assemble(node)
    with node.db.sessionmaker() as s:
        job_a = s.execute(select(Job.id).where(Job.id.in_(jobs), Job.study.has(
            study_instance_uid=a[0].StudyInstanceUID))).scalar_one()
        job_c = s.execute(select(Job.id).where(Job.id.in_(jobs), Job.study.has(
            study_instance_uid=c[0].StudyInstanceUID))).scalar_one()
    ordered = sorted(a, key=lambda ds: int(ds.InstanceNumber))
    mask = np.zeros((3, 8, 8), bool)
    mask[1, 2:5, 3:6] = True
    seg = build_seg(ordered, mask)
    seg_path = save_seg_output(node, job_a, seg)
    # A result whose file is gone: listed from SQL, not retrievable.
    with node.db.session() as s:
        s.add(Output(job_id=job_c, kind="sr", sop_class_uid=COMPREHENSIVE_3D_SR, sop_instance_uid=generate_uid(),
                     series_instance_uid=generate_uid(), path=f"job-{job_c}/sr.dcm", size_bytes=1, sha256="0" * 64))
    return Corpus(node, a, b_mr, b_ct, c, seg, seg_path)


@pytest.fixture
def corpus(node: Node) -> Corpus:
    return make_corpus(node)


@pytest.fixture
def client(node: Node) -> Iterator[TestClient]:
    with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=TEST_AUTH) as c:
        yield c


def search(c: TestClient, path: str, **params: Any) -> list[dict[str, Any]]:
    r = c.get(f"/dicomweb/{path}", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == JSON
    body = r.json()
    assert isinstance(body, list)
    return body


def uids(items: list[dict[str, Any]], tag: str = STUDY_UID) -> list[str]:
    return [v(i, tag) for i in items]


def test_search_studies_matching_and_attributes(corpus: Corpus, client: TestClient) -> None:
    a, b, c = corpus.a[0].StudyInstanceUID, corpus.b_mr[0].StudyInstanceUID, corpus.c[0].StudyInstanceUID
    studies = search(client, "studies")
    assert uids(studies) == [c, b, a]  # newest first
    by_uid = {v(s, STUDY_UID): s for s in studies}
    sa = by_uid[a]
    assert v(sa, "00100020") == "P-A" and v(sa, "00100010") == "Doe^Jane" and v(sa, "00080020") == "20240105"
    assert v(sa, "00080050") == "ACC-100" and v(sa, "00080030") == "083000" and v(sa, "00100040") == "F"
    assert v(sa, "00080090") == "Ref^Doctor" and v(sa, "00081030") == "Head" and v(sa, "00080056") == "ONLINE"
    assert sa[MODALITIES]["Value"] == ["CT", "SEG"]  # the node's SEG is part of the study
    assert (v(sa, N_SERIES), v(sa, N_INSTANCES)) == (2, 4)
    assert v(sa, RETRIEVE_URL) == f"http://testserver/dicomweb/studies/{a}"
    assert sa["00100030"] == {"vr": "DA"}  # an empty default attribute is still returned
    assert by_uid[b][MODALITIES]["Value"] == ["CT", "MR"] and v(by_uid[b], N_INSTANCES) == 4
    assert by_uid[c][MODALITIES]["Value"] == ["CT", "SR"] and v(by_uid[c], N_SERIES) == 2

    def match(**params: Any) -> list[str]:
        return uids(search(client, "studies", **params))

    assert match(PatientID="P-A") == [a]
    assert match(**{"00100020": "P-B"}) == [b]  # a tag instead of the keyword
    assert match(PatientID="p-a") == [] and match(PatientID="p-*") == []  # text matching is case-sensitive
    assert match(PatientID="P-?") == [c, b, a]
    assert match(PatientName="roe*") == [b] and match(PatientName="*an*") == [c, a]  # names: case-insensitive
    assert match(PatientName="D?e^Jane") == [a] and match(PatientName="Doe") == []
    assert match(AccessionNumber="ACC-*") == [b, a] and match(AccessionNumber="ACC_100") == []  # _ is literal
    assert match(StudyDate="20240105") == [a]
    assert match(StudyDate="20240101-20241231") == [b, a]
    assert match(StudyDate="-20240105") == [c, a]
    assert match(StudyDate="20240106-") == [b]
    assert match(StudyInstanceUID=f"{a},{c}") == [c, a]
    assert match(StudyInstanceUID=[a, b]) == [b, a]
    assert match(ModalitiesInStudy="MR") == [b] and match(ModalitiesInStudy="SEG") == [a]
    assert match(ModalitiesInStudy="MR,SEG") == [b, a] and match(ModalitiesInStudy="MR\\SEG") == [b, a]
    assert match(PatientID="P-A", StudyDate="20240320") == []
    assert match(PatientID="", StudyDate="*") == [c, b, a]  # universal matching
    assert search(client, "studies", PatientID="NOBODY") == []  # no match: 200 with []
    # Paging.
    assert match(limit=2) == [c, b] and match(limit=2, offset=2) == [a] and match(offset=5) == []
    # Returned attributes.
    default = set(search(client, "studies", PatientID="P-A")[0])
    extra = search(client, "studies", PatientID="P-A", includefield="SeriesDescription,00180050")[0]
    assert set(extra) - default == {"0008103E", "00180050"} and v(extra, "00180050") == 1.0
    everything = search(client, "studies", PatientID="P-A", includefield="all")[0]
    assert set(everything) >= default and SOP_UID not in everything


def test_search_warnings_errors_and_accept(corpus: Corpus, client: TestClient) -> None:
    r = client.get("/dicomweb/studies", params={"fuzzymatching": "true", "PatientSex": "M"})
    assert r.status_code == 200 and len(r.json()) == 3  # the unsupported key is ignored, and says so
    assert "fuzzymatching is not supported" in r.headers["warning"]
    assert "matching on PatientSex is not supported" in r.headers["warning"]
    assert "warning" not in client.get("/dicomweb/studies", params={"fuzzymatching": "false"}).headers
    r = client.get("/dicomweb/studies", params={"limit": 5000})
    assert r.status_code == 200 and "limit is at most 1000" in r.headers["warning"]
    bad = {
        "StudyDate": ("2024", "dates are YYYYMMDD"), "PatientBirthDat": ("x", "is not a DICOM keyword"),
        "StudyInstanceUID": ("1.02.3", "StudyInstanceUID is not a valid UID"), "limit": ("0", "limit takes"),
        "offset": ("-1", "offset takes"), "includefield": ("Nonsense", "includefield takes"),
    }
    for key, (value, detail) in bad.items():
        r = client.get("/dicomweb/studies", params={key: value})
        assert r.status_code == 400 and detail in r.json()["detail"], (key, r.text)
    r = client.get("/dicomweb/studies", params={"StudyDate": "20240105-20240101"})
    assert r.status_code == 400 and "ends before it starts" in r.json()["detail"]
    r = client.get("/dicomweb/studies", params=[("PatientID", "A"), ("PatientID", "B")])
    assert r.status_code == 400 and "more than once" in r.json()["detail"]
    r = client.get("/dicomweb/series", params={"SeriesNumber": "two"})
    assert r.status_code == 400 and "SeriesNumber takes an integer" in r.json()["detail"]
    assert client.get("/dicomweb/studies/1.02/series").status_code == 400
    r = client.get("/dicomweb/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert r.status_code == 406
    assert client.get("/dicomweb/studies", headers={"Accept": "application/json"}).status_code == 200


def test_search_series_and_instances(corpus: Corpus, client: TestClient) -> None:
    a, b = corpus.a[0].StudyInstanceUID, corpus.b_mr[0].StudyInstanceUID
    series = search(client, f"studies/{a}/series")
    assert uids(series, SERIES_UID) == [corpus.a[0].SeriesInstanceUID, corpus.seg.SeriesInstanceUID]
    ct, seg = series
    assert (v(ct, "00080060"), v(ct, "00200011"), v(ct, N_SERIES_INSTANCES)) == ("CT", 1, 3)
    assert (v(seg, "00080060"), v(seg, "00200011"), v(seg, N_SERIES_INSTANCES)) == ("SEG", 9901, 1)
    assert v(seg, RETRIEVE_URL) == f"http://testserver/dicomweb/studies/{a}/series/{corpus.seg.SeriesInstanceUID}"
    assert "00100020" not in ct  # study attributes only when searching all series
    assert uids(search(client, f"studies/{b}/series", Modality="CT"), SERIES_UID) == [
        corpus.b_ct[0].SeriesInstanceUID]
    assert uids(search(client, f"studies/{b}/series", SeriesNumber=2), SERIES_UID) == [
        corpus.b_ct[0].SeriesInstanceUID]
    # Every series, with study attributes; study keys match too.
    every = search(client, "series")
    assert len(every) == 6 and v(every[0], "00100020") == "P-C" and v(every[0], N_INSTANCES) == 2
    gone = every[1]  # the SR result without its file: what SQL knows
    assert v(gone, "00080060") == "SR" and gone["00200011"] == {"vr": "IS"} and v(gone, N_SERIES_INSTANCES) == 1
    assert uids(search(client, "series", Modality="SEG"), SERIES_UID) == [corpus.seg.SeriesInstanceUID]
    assert uids(search(client, "series", PatientName="roe*", Modality="MR"), SERIES_UID) == [
        corpus.b_mr[0].SeriesInstanceUID]
    assert len(search(client, "series", SeriesDescription="AX*")) == 4 and search(client, "series",
                                                                                   SeriesDescription="ax*") == []
    # Instances of a series, by instance number.
    sid = corpus.a[0].SeriesInstanceUID
    inst = search(client, f"studies/{a}/series/{sid}/instances")
    by_number = sorted(corpus.a, key=lambda ds: int(ds.InstanceNumber))
    assert uids(inst, SOP_UID) == [ds.SOPInstanceUID for ds in by_number]
    first = inst[0]
    assert (v(first, "00280010"), v(first, "00280011"), v(first, "00280100"), v(first, "00200013")) == (8, 8, 16, 1)
    assert v(first, "00080016") == corpus.a[0].SOPClassUID and v(first, "00080056") == "ONLINE"
    assert v(first, RETRIEVE_URL).endswith(f"/series/{sid}/instances/{by_number[0].SOPInstanceUID}")
    assert "0008103E" not in first and "00100020" not in first
    assert uids(search(client, f"studies/{a}/series/{sid}/instances", InstanceNumber=2), SOP_UID) == [
        by_number[1].SOPInstanceUID]
    # Instances of a study: with the series attributes, the SEG included.
    study_inst = search(client, f"studies/{a}/instances")
    assert uids(study_inst, SOP_UID) == [*(ds.SOPInstanceUID for ds in by_number), corpus.seg.SOPInstanceUID]
    seg_item = study_inst[-1]
    assert v(seg_item, "00080060") == "SEG" and v(seg_item, N_SERIES_INSTANCES) == 1
    assert v(seg_item, "00280008") == 3  # NumberOfFrames from the stored SEG's header
    assert uids(search(client, f"studies/{a}/instances", Modality="SEG"), SOP_UID) == [corpus.seg.SOPInstanceUID]
    # All instances, with study attributes.
    everything = search(client, "instances", limit=1000)
    assert len(everything) == 10 and v(everything[0], "00100020") == "P-C"
    one = search(client, "instances", SOPInstanceUID=corpus.b_mr[1].SOPInstanceUID, includefield="all")
    assert len(one) == 1 and v(one[0], "00180050") == 1.0 and v(one[0], N_INSTANCES) == 4
    assert PIXEL_DATA not in one[0]
    r = client.get("/dicomweb/instances", params={"limit": 3})
    assert len(r.json()) == 3 and "warning" not in r.headers
    r = client.get("/dicomweb/instances")
    assert len(r.json()) == 10 and "warning" not in r.headers


def test_wado_study_retrieve_and_metadata(corpus: Corpus, client: TestClient) -> None:
    a = corpus.a[0].StudyInstanceUID
    got = parts(client.get(f"/dicomweb/studies/{a}"))
    assert [ct for ct, _ in got] == ["application/dicom"] * 4
    stored = {ds.SOPInstanceUID: ds for ds in (dcmread(io.BytesIO(data)) for _, data in got)}
    assert set(stored) == {*(ds.SOPInstanceUID for ds in corpus.a), corpus.seg.SOPInstanceUID}
    assert got[-1][1] == corpus.seg_path.read_bytes()  # the result, bytes as stored

    meta = client.get(f"/dicomweb/studies/{a}/metadata")
    assert meta.status_code == 200 and meta.headers["content-type"] == JSON
    items = meta.json()
    assert len(items) == 4
    base = f"http://testserver/dicomweb/studies/{a}/series"
    for item in items:
        url = f"{base}/{v(item, SERIES_UID)}/instances/{v(item, SOP_UID)}"
        assert item[PIXEL_DATA]["BulkDataURI"] == f"{url}/bulk/{PIXEL_DATA}"
        assert v(item, "00080005") == "ISO_IR 192" and v(item, "00083002")
    ct = items[0]
    assert ct[PIXEL_DATA]["vr"] == "OW" and v(ct, "00100010") == "Doe^Jane" and v(ct, "00280010") == 8
    assert items[-1][PIXEL_DATA]["vr"] == "OB"  # 1-bit SEG
    sid, sop = corpus.a[0].SeriesInstanceUID, corpus.a[0].SOPInstanceUID
    one = client.get(f"/dicomweb/studies/{a}/series/{sid}/instances/{sop}/metadata").json()
    assert len(one) == 1 and v(one[0], SOP_UID) == sop
    assert len(client.get(f"/dicomweb/studies/{a}/series/{sid}/metadata").json()) == 3
    # The pixel data's BulkDataURI answers the frames.
    bulk = parts(client.get(ct[PIXEL_DATA]["BulkDataURI"]))
    assert [b for _, b in bulk] == [dcmread(corpus.node.store.root / a / sid / f"{v(ct, SOP_UID)}.dcm").PixelData]
    assert bulk[0][0] == f"application/octet-stream; transfer-syntax={EVRLE}"
    # Errors.
    c = corpus.c[0].StudyInstanceUID
    assert len(parts(client.get(f"/dicomweb/studies/{c}"))) == 1  # the SR result's file is missing
    gone = search(client, f"studies/{c}/series", Modality="SR")[0]
    assert client.get(v(gone, RETRIEVE_URL)).status_code == 404
    assert client.get(f"/dicomweb/studies/{generate_uid()}").status_code == 404
    assert client.get(f"/dicomweb/studies/{generate_uid()}/metadata").status_code == 404
    assert client.get(f"/dicomweb/studies/{a}/series/{sid}/instances/{generate_uid()}/metadata").status_code == 404
    assert client.get("/dicomweb/studies/1.02.3/metadata").status_code == 400
    assert client.get(f"/dicomweb/studies/{a}/series/{sid}/instances/{sop}/bulk/7FE0").status_code == 400
    assert client.get(f"/dicomweb/studies/{a}/series/{sid}/instances/{sop}/bulk/00100010").status_code == 404
    assert client.get(f"/dicomweb/studies/{a}/metadata", headers={"Accept": "application/dicom+xml"}).status_code \
        == 406
    r = client.get(f"/dicomweb/studies/{a}", headers={"Accept": 'multipart/related; type="application/dicom"; '
                                                                  "transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert r.status_code == 406 and "stored transfer syntax" in r.json()["detail"]
    r = client.get(f"/dicomweb/studies/{a}/series/{sid}", headers={
        "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}'})
    assert r.status_code == 200 and len(parts(r)) == 3


def test_results_are_left_out_without_an_outputs_directory(api_node: Node) -> None:
    series = gradient_series(2, 4, 4)
    ingest(api_node, series)
    (job,) = assemble(api_node)
    seg = build_seg(sorted(series, key=lambda ds: int(ds.InstanceNumber)), np.ones((2, 4, 4), bool))
    with api_node.db.session() as s:  # what a remote worker records: its file is on its own host
        s.add(Output(job_id=job, kind="seg", sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                     series_instance_uid=seg.SeriesInstanceUID, path=f"job-{job}/seg.dcm", size_bytes=1,
                     sha256="0" * 64))
    study = series[0].StudyInstanceUID
    with TestClient(create_app(api_node, dispatcher=FakeDispatcher()), headers=TEST_AUTH) as c:
        (found,) = search(c, "studies")
        assert found[MODALITIES]["Value"] == ["CT"] and (v(found, N_SERIES), v(found, N_INSTANCES)) == (1, 2)
        assert uids(search(c, f"studies/{study}/series"), SERIES_UID) == [series[0].SeriesInstanceUID]
        assert search(c, "studies", ModalitiesInStudy="SEG") == []
        # With the worker's outputs directory on the node, the result is served.
        path = api_node.settings.data_dir / "outputs" / f"job-{job}" / "seg.dcm"
        path.parent.mkdir(parents=True)
        seg.save_as(path, enforce_file_format=True)
        assert uids(search(c, "studies", ModalitiesInStudy="SEG")) == [study]
        assert uids(search(c, f"studies/{study}/instances", Modality="SEG"), SOP_UID) == [seg.SOPInstanceUID]
        assert [d for _, d in parts(c.get(f"/dicomweb/studies/{study}/series/{seg.SeriesInstanceUID}"))] == [
            path.read_bytes()]


def _ingest_file(node: Node, name: str) -> Dataset:
    data = Path(get_testdata_file(name)).read_bytes()
    outcome = node.ingestor.ingest(data, parse_meta(data), source="stowrs", calling_aet=None)
    assert outcome.status == 0, outcome
    return dcmread(get_testdata_file(name))


def _frames_url(ds: Dataset, frames: str) -> str:
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/frames/{frames}")


def test_frames_decoded_or_as_stored(tmp_path: Path, sqlite_url: str) -> None:
    node = Node.from_settings(make_settings(tmp_path, sqlite_url), migrate=True)
    try:
        jpeg = _ingest_file(node, "SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline, YBR_FULL
        rle = _ingest_file(node, "MR_small_RLE.dcm")  # RLE lossless of MR_small.dcm
        rle2 = _ingest_file(node, "SC_rgb_rle_2frame.dcm")
        native = gradient_series(4, 5, 5)  # 25 pixels per frame: a 1-bit frame does not start on a byte
        ingest(node, native)
        seg = build_seg(sorted(native, key=lambda ds: int(ds.InstanceNumber)), np.eye(5, dtype=bool)[None].repeat(4, 0))
        ingest(node, [seg])
        with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=TEST_AUTH) as c:
            # JPEG: decoded by default (RGB, interleaved), as stored on request.
            (ctype, data), = parts(c.get(_frames_url(jpeg, "1")))
            assert ctype == f"application/octet-stream; transfer-syntax={EVRLE}"
            assert data == jpeg.pixel_array.tobytes() and len(data) == 100 * 100 * 3
            compressed = get_frame(jpeg.PixelData, 0, number_of_frames=1)
            for accept in ("multipart/related; type=application/octet-stream; transfer-syntax=*",
                           'multipart/related; type="image/jpeg"',
                           "multipart/related; type=image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"):
                r = c.get(_frames_url(jpeg, "1"), headers={"Accept": accept})
                (ctype, data), = parts(r)
                assert data == compressed and ctype.endswith("transfer-syntax=1.2.840.10008.1.2.4.50"), accept
            r = c.get(_frames_url(jpeg, "1"), headers={"Accept": 'multipart/related; type="image/jp2"'})
            assert r.status_code == 406 and "does not re-encode" in r.json()["detail"]
            r = c.get(_frames_url(jpeg, "1"), headers={
                "Accept": 'multipart/related; type="image/jp2", multipart/related; type="application/octet-stream"'})
            assert r.status_code == 200  # the second choice
            # RLE: decoded to exactly the uncompressed file's bytes.
            mr_small = dcmread(get_testdata_file("MR_small.dcm"))
            assert parts(c.get(_frames_url(rle, "1")))[0][1] == mr_small.PixelData
            frames = [data for _, data in parts(c.get(_frames_url(rle2, "2,1")))]
            assert frames == [rle2.pixel_array[1].tobytes(), rle2.pixel_array[0].tobytes()]
            # Native: the stored bytes; a 1-bit SEG frame re-packed to start on a byte.
            ds = native[0]
            assert parts(c.get(_frames_url(ds, "1")))[0][1] == ds.PixelData
            seg_frames = [data for _, data in parts(c.get(_frames_url(seg, "3,2")))]
            assert seg_frames == [np.packbits(seg.pixel_array[i].ravel(), bitorder="little").tobytes() for i in (2, 1)]
            # The pixel data's BulkDataURI: natively one part (the whole value), as stored one part per frame.
            def bulk(ds: Dataset, accept: str | None = None) -> list[bytes]:
                url = _frames_url(ds, "1").replace("/frames/1", f"/bulk/{PIXEL_DATA}")
                return [d for _, d in parts(c.get(url, headers={"Accept": accept} if accept else {}))]

            assert bulk(seg) == [seg.PixelData]
            assert bulk(rle2) == [rle2.pixel_array.tobytes()]
            assert bulk(rle2, "multipart/related; type=application/octet-stream; transfer-syntax=*") == [
                get_frame(rle2.PixelData, i, number_of_frames=2) for i in (0, 1)]
            # Bad frame lists, unknown instance.
            for bad in ("0", "a", "1,,2", "-1", "2"):
                r = c.get(_frames_url(ds, bad))
                assert r.status_code == 400, bad
            assert "the instance has 1 frame(s)" in c.get(_frames_url(ds, "2")).json()["detail"]
            unknown = ds.copy()
            unknown.SOPInstanceUID = generate_uid()
            assert c.get(_frames_url(unknown, "1")).status_code == 404
    finally:
        node.close()


@contextmanager
def uvicorn_server(node: Node) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node, dispatcher=FakeDispatcher()), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}/dicomweb"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_dicomweb_client_against_a_real_server(corpus: Corpus) -> None:
    node = corpus.node
    jpeg = _ingest_file(node, "SC_rgb_jpeg_dcmtk.dcm")
    a = corpus.a[0]
    with uvicorn_server(node) as url:
        dw = DICOMwebClient(url=url, headers=TEST_AUTH)
        studies = dw.search_for_studies(search_filters={"PatientID": "P-A"}, fields=["StudyDescription"])
        assert uids(studies) == [a.StudyInstanceUID] and v(studies[0], N_INSTANCES) == 4
        assert len(dw.search_for_studies(limit=2, offset=1)) == 2
        assert len(dw.search_for_studies(get_remaining=True)) == 4
        series = dw.search_for_series(a.StudyInstanceUID)
        assert uids(series, SERIES_UID) == [a.SeriesInstanceUID, corpus.seg.SeriesInstanceUID]
        inst = dw.search_for_instances(a.StudyInstanceUID, a.SeriesInstanceUID, search_filters={"InstanceNumber": 3})
        assert len(inst) == 1 and v(inst[0], "00200013") == 3
        meta = dw.retrieve_study_metadata(a.StudyInstanceUID)
        assert len(meta) == 4 and all(PIXEL_DATA in m for m in meta)
        first = next(m for m in meta if v(m, SOP_UID) == a.SOPInstanceUID)
        (frame,) = dw.retrieve_instance_frames(a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID, [1])
        assert frame == a.PixelData
        # dicomweb-client sends "Host: 127.0.0.1" without the port, so the node's
        # absolute BulkDataURI (built from Host, as browsers send it) lacks it too.
        bulk = urlsplit(first[PIXEL_DATA]["BulkDataURI"])
        assert bulk.hostname == "127.0.0.1" and bulk.path.endswith(f"/instances/{a.SOPInstanceUID}/bulk/{PIXEL_DATA}")
        assert dw.retrieve_bulkdata(urlsplit(url)._replace(path=bulk.path).geturl()) == [a.PixelData]
        (decoded,) = dw.retrieve_instance_frames(jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID, jpeg.SOPInstanceUID,
                                                 [1], media_types=(("application/octet-stream", EVRLE),))
        assert decoded == jpeg.pixel_array.tobytes()
        (raw,) = dw.retrieve_instance_frames(jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID, jpeg.SOPInstanceUID,
                                             [1], media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),))
        assert raw == get_frame(jpeg.PixelData, 0, number_of_frames=1)
        retrieved = dw.retrieve_study(a.StudyInstanceUID)
        assert {ds.SOPInstanceUID for ds in retrieved} == {*(d.SOPInstanceUID for d in corpus.a),
                                                           corpus.seg.SOPInstanceUID}
        anonymous = DICOMwebClient(url=url)
        with pytest.raises(requests.HTTPError) as err:
            anonymous.search_for_studies()
        assert err.value.response.status_code == 401


NEW_ROUTES = (
    "studies", "series", "instances", "studies/{a}/series", "studies/{a}/instances",
    "studies/{a}/series/{s}/instances", "studies/{a}", "studies/{a}/metadata",
    "studies/{a}/series/{s}/instances/{i}/metadata", "studies/{a}/series/{s}/instances/{i}/frames/1",
    "studies/{a}/series/{s}/instances/{i}/bulk/7FE00010",
)


def test_new_routes_need_a_read_token(tmp_path: Path, sqlite_url: str) -> None:
    writer = "pn_writer-" + "w" * 32
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__tokens=tokens_env(
        ("test", TEST_TOKEN, ["read", "write"]), ("writer", writer, ["write"]))),
        migrate=True)
    try:
        series = gradient_series(1, 4, 4)
        ingest(node, series)
        ds = series[0]
        with TestClient(create_app(node, dispatcher=FakeDispatcher())) as c:
            for route in NEW_ROUTES:
                url = "/dicomweb/" + route.format(a=ds.StudyInstanceUID, s=ds.SeriesInstanceUID, i=ds.SOPInstanceUID)
                r = c.get(url)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", route
                assert c.get(url, headers={"Authorization": f"Bearer {writer}"}).status_code == 403, route
                assert c.get(url, headers=TEST_AUTH).status_code == 200, route
            docs = c.get("/openapi.json").json()["paths"]
            for route in NEW_ROUTES:
                path = "/dicomweb/" + route.format(a="{study_uid}", s="{series_uid}", i="{sop_uid}")
                path = path.replace("frames/1", "frames/{frames}").replace("bulk/7FE00010", "bulk/{tag_path}")
                assert docs[path]["get"]["summary"], path
    finally:
        node.close()


def test_cors_lets_a_configured_viewer_origin_call_dicomweb_with_its_token(tmp_path: Path, sqlite_url: str) -> None:
    """OHIF on its own host: the preflight and the answer name the origin;
    another origin gets no CORS headers; the token is still required."""
    import pydantic

    from pacs_node.config import HttpSettings

    origin = "https://ohif.example.org"
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__cors_allow_origins=f'["{origin}"]'),
                              migrate=True)
    try:
        with TestClient(create_app(node, dispatcher=FakeDispatcher())) as client:
            pre = client.options("/dicomweb/studies", headers={
                "Origin": origin, "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, accept"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == origin
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            ok = client.get("/dicomweb/studies", headers={"Origin": origin, **TEST_AUTH})
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
            assert "access-control-allow-credentials" not in ok.headers
            assert client.get("/dicomweb/studies", headers={"Origin": origin}).status_code == 401
            other = client.get("/dicomweb/studies", headers={"Origin": "https://evil.example", **TEST_AUTH})
            assert "access-control-allow-origin" not in other.headers
    finally:
        node.close()
    with pytest.raises(pydantic.ValidationError, match="name each origin"):
        HttpSettings(cors_allow_origins=["*"])
    with pytest.raises(pydantic.ValidationError, match="is not scheme://host"):
        HttpSettings(cors_allow_origins=["ohif.example.org/viewer"])
