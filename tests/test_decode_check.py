"""Decode check at receive and parse limits (pacs_node.ingest.header /
.validate): every undecodable instance is refused with 0xC210 (or 0xA700 for
a size limit) before anything is written, over DIMSE C-STORE with a real
pynetdicom peer and over STOW-RS; each crasher the fuzz campaign and the
security review found is a named test here."""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import func, select

from dicom_factory import make_instance, to_bytes
from nodetest import TEST_AUTH, free_port, make_settings
from pacs_node.api.app import create_app
from pacs_node.config import IngestSettings
from pacs_node.db.models import Instance
from pacs_node.ingest.dimse import DimseServer
from pacs_node.ingest.errors import IngestError, Status
from pacs_node.ingest.header import encode_part10, parse_meta
from pacs_node.node import Node

BOUNDARY = "decode-check-5e1"
CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def image(**kw: object) -> Dataset:
    return make_instance(study_uid=generate_uid(), series_uid=generate_uid(), **kw)  # type: ignore[arg-type]


def refused(data: bytes, *, checks: IngestSettings | None = None, ts: str | None = None) -> IngestError:
    with pytest.raises(IngestError) as info:
        parse_meta(data, transfer_syntax_uid=ts, checks=checks)
    return info.value


def encapsulated(ds: Dataset, ts: str, frames: list[bytes], *, offset_table: bool = False) -> bytes:
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate(frames, has_bot=offset_table)
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = len(frames)
    return to_bytes(ds)


def stored_files(node: Node) -> list[Path]:
    return sorted(p for p in node.store.root.rglob("*") if p.is_file())


def rows(node: Node) -> int:
    with node.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


# --------------------------------------------------------------------------- native pixel data
def test_valid_native_image_passes_and_is_indexed() -> None:
    ds = image(rows=32, cols=24)
    meta = parse_meta(to_bytes(ds))
    assert meta.sop_uid == ds.SOPInstanceUID and meta.instance_number == 1


def test_truncated_native_pixel_data_is_refused() -> None:
    ds = image(rows=32, cols=32)
    ds.PixelData = ds.PixelData[:-200]
    err = refused(to_bytes(ds))
    assert err.status == Status.CANNOT_UNDERSTAND
    assert "1848 bytes" in err.comment and "need 2048" in err.comment


def test_pixel_data_shorter_than_its_declared_length_is_refused() -> None:
    data = to_bytes(image(rows=16, cols=16))
    err = refused(data[:-100])  # the element says 512 bytes, 412 arrived
    assert err.status == Status.CANNOT_UNDERSTAND and "declares 512 bytes" in err.comment


def test_geometry_that_disagrees_with_the_pixel_length_is_refused() -> None:
    for change in ({"Rows": 64}, {"BitsAllocated": 32}, {"SamplesPerPixel": 3}, {"NumberOfFrames": 4}):
        ds = image(rows=16, cols=16)
        for k, v in change.items():
            setattr(ds, k, v)
        assert refused(to_bytes(ds)).status == Status.CANNOT_UNDERSTAND, change


def test_odd_padding_and_small_vendor_padding_are_accepted() -> None:
    ds = image(rows=15, cols=15)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(225)  # pydicom pads to 226 on write
    parse_meta(to_bytes(ds))
    ds = image(rows=16, cols=16)
    ds.PixelData = ds.PixelData + bytes(128)  # as pydicom's MR_small_padded.dcm
    parse_meta(to_bytes(ds))


def test_missing_rows_or_bad_bits_allocated_is_refused() -> None:
    ds = image()
    del ds.Rows
    assert "Rows and Columns" in refused(to_bytes(ds)).comment
    ds = image()
    ds.BitsAllocated = 12
    assert "Bits Allocated 12" in refused(to_bytes(ds)).comment


@pytest.mark.parametrize(
    ("keyword", "value", "says"),
    [
        ("BitsAllocated", None, "Bits Allocated None"),
        ("SamplesPerPixel", None, "Samples per Pixel None"),
        ("PixelRepresentation", None, "Pixel Representation"),
        ("BitsStored", 144, "Bits Stored 144"),
        ("PhotometricInterpretation", "MONOCHOME2", "Photometric Interpretation"),
        ("PhotometricInterpretation", None, "Photometric Interpretation"),
    ],
)
def test_regression_image_pixel_module_attributes_the_decoder_needs(keyword: str, value: object, says: str) -> None:
    """Fuzz campaign seed 20261204: each of these was acknowledged, then
    failed in the worker's decoder."""
    ds = image()
    ds["PixelData"].VR = "OW"  # pydicom needs Bits Allocated to choose it
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    err = refused(to_bytes(ds))
    assert err.status == Status.CANNOT_UNDERSTAND and says in err.comment


def test_instance_without_pixel_data_passes() -> None:
    ds = image()
    del ds.PixelData
    parse_meta(to_bytes(ds))


def test_decode_check_off_still_checks_the_header() -> None:
    ds = image()
    ds.PixelData = ds.PixelData[:10]
    off = IngestSettings(decode_check="off")
    parse_meta(to_bytes(ds), checks=off)
    del ds.StudyInstanceUID
    assert refused(to_bytes(ds), checks=off).status == Status.INVALID_UID


# --------------------------------------------------------------------------- encapsulated pixel data
@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEG2000.dcm",
     "693_J2KI.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
     "SC_rgb_rle_16bit_2frame.dcm", "rtdose_rle.dcm", "examples_ybr_color.dcm", "image_dfl.dcm"],
)
def test_real_compressed_files_pass_structure_and_full_decode(name: str) -> None:
    data = Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]
    parse_meta(data)
    parse_meta(data, checks=IngestSettings(decode_check="full"))


def test_garbage_jpeg_fragment_is_refused() -> None:
    data = encapsulated(image(rows=16, cols=16), JPEGBaseline8Bit, [b"\x00garbage-not-jpeg\x00"])
    err = refused(data)
    assert err.status == Status.CANNOT_UNDERSTAND and "JPEG SOI" in err.comment


def test_garbage_jpeg2000_fragment_is_refused() -> None:
    data = encapsulated(image(rows=16, cols=16), JPEG2000Lossless, [b"\xff\xd8\xff\xe0 jpeg, not j2k"])
    assert "JPEG 2000 codestream" in refused(data).comment


def test_bad_rle_header_is_refused() -> None:
    header = struct.pack("<16L", 99, *([0] * 15))
    data = encapsulated(image(rows=16, cols=16), RLELossless, [header + bytes(100)])
    assert "lists 99 segments" in refused(data).comment
    header = struct.pack("<16L", 1, 5000, *([0] * 14))
    data = encapsulated(image(rows=16, cols=16), RLELossless, [header + bytes(100)])
    assert "outside the frame" in refused(data).comment


def test_fewer_fragments_than_frames_is_refused() -> None:
    ds = image(rows=16, cols=16)
    data = encapsulated(ds, JPEGBaseline8Bit, [b"\xff\xd8\xff\xd9"] * 3)
    parsed = dcmread(io.BytesIO(data))
    parsed.NumberOfFrames = 5
    err = refused(to_bytes(parsed))
    assert "3 fragments cannot hold 5 frames" in err.comment


def test_offset_table_that_disagrees_with_the_frame_count_is_refused() -> None:
    ds = image(rows=16, cols=16)
    data = encapsulated(ds, JPEGBaseline8Bit, [b"\xff\xd8\xff\xd9"] * 3, offset_table=True)
    parsed = dcmread(io.BytesIO(data))
    parsed.NumberOfFrames = 2
    assert "Basic Offset Table lists 3 frames" in refused(to_bytes(parsed)).comment


def test_fragment_longer_than_the_data_set_is_refused() -> None:
    data = encapsulated(image(rows=16, cols=16), JPEGBaseline8Bit, [b"\xff\xd8" + bytes(200) + b"\xff\xd9"])
    cut = data[:-120]  # the item says 204 bytes; fewer arrive, no delimiter
    err = refused(cut)
    assert err.status == Status.CANNOT_UNDERSTAND and "remain" in err.comment


def test_full_decode_refuses_a_corrupt_jpeg_that_structure_accepts() -> None:
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    # A JPEG SOI marker, then no valid segment at all.
    ds.PixelData = encapsulate([b"\xff\xd8" + np.random.default_rng(7).bytes(600) + b"\xff\xd9"])
    data = to_bytes(ds)
    parse_meta(data)  # structure: starts with SOI
    err = refused(data, checks=IngestSettings(decode_check="full"))
    assert err.status == Status.CANNOT_UNDERSTAND and "RuntimeError" in err.comment


# --------------------------------------------------------------------------- parse errors (fuzz crashers)
def _implicit(elements: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for tag, value in elements:
        out += struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value
    return bytes(out)


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + (b"\x00" if len(raw) % 2 else b"")


def _ids(study: str, series: str, sop: str) -> dict[int, bytes]:
    return {0x00080016: _uid(CT_IMAGE), 0x00080018: _uid(sop), 0x0020000D: _uid(study), 0x0020000E: _uid(series)}


def test_regression_deeply_nested_sequences_are_refused_not_a_recursion_traceback() -> None:
    ids = _ids(generate_uid(), generate_uid(), generate_uid())
    nested = b"".join(
        struct.pack("<HHL", 0x0008, 0x1115, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        for _ in range(5000)
    )
    body = _implicit([(0x00080016, ids[0x00080016]), (0x00080018, ids[0x00080018])]) + nested
    err = refused(body, ts=str(ImplicitVRLittleEndian))
    assert err.status == Status.CANNOT_UNDERSTAND


def test_regression_is_value_1e400_is_not_an_overflow_traceback() -> None:
    ds = image()
    ds.SeriesNumber = "12345"
    meta = parse_meta(to_bytes(ds).replace(b"12345 ", b"1e400 "))
    assert meta.series_number is None
    ds.NumberOfFrames = "12345"
    data = to_bytes(ds).replace(b"12345 ", b"1e400 ")  # pydicom will not write it itself
    err = refused(data)
    assert err.status == Status.CANNOT_UNDERSTAND and "NumberOfFrames" in err.comment


def test_regression_instance_number_beyond_64_bits_is_not_indexed() -> None:
    ds = image()
    ds["InstanceNumber"].value = "99999999999999999999"
    assert parse_meta(to_bytes(ds)).instance_number is None


def test_regression_unknown_vr_is_refused() -> None:
    ds = image()
    data = bytearray(to_bytes(ds))
    at = data.index(b"\x08\x00\x20\x00DA")  # Study Date
    data[at + 4 : at + 6] = b"\x01\x02"
    # pydicom may fall back to implicit VR on an unknown VR; either way the
    # result is an answer, never an exception other than IngestError.
    try:
        parse_meta(bytes(data))
    except IngestError as exc:
        assert exc.status in (Status.CANNOT_UNDERSTAND, Status.INVALID_UID)


def test_regression_corrupt_deflate_stream_is_refused() -> None:
    ds = image()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(ds)
    start = data.index(b"\x02\x00\x10\x00") + 8 + len(DeflatedExplicitVRLittleEndian) + 1
    end = data.index(b"DICM") + 4
    # Keep the File Meta, garble the deflated data set after it.
    body_at = end + 12 + struct.unpack_from("<L", data, end + 8)[0]
    broken = data[:body_at] + b"\xff\xff\xff\xff" + data[body_at + 4 :]
    assert start < body_at
    assert refused(broken).status == Status.CANNOT_UNDERSTAND
    assert "truncated" in refused(data[: body_at + 40]).comment


def test_regression_deflate_bomb_is_refused_in_bounded_memory() -> None:
    ds = image()
    ds.add_new(0x00091010, "LO", "BOMB")
    ds.add_new(0x00091011, "OB", bytes(8 * 1024 * 1024))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(ds)
    assert len(data) < 64 * 1024
    err = refused(data, checks=IngestSettings(max_inflated_bytes=1024 * 1024))
    assert err.status == Status.OUT_OF_RESOURCES and "max_inflated_bytes" in err.comment
    parse_meta(data, checks=IngestSettings(max_inflated_bytes=16 * 1024 * 1024))


def test_regression_a_tag_above_pixel_data_does_not_hide_the_pixel_data() -> None:
    """Fuzz campaign seed 20261204 case 200: Bits Allocated's tag became
    (8028,0100); the header reader stopped there and the pixel data after it
    went unchecked."""
    ds = image()
    data = to_bytes(ds)
    at = data.index(b"\x28\x00\x00\x01US")  # (0028,0100) Bits Allocated
    mutated = data[:at] + b"\x28\x80" + data[at + 2 :]
    err = refused(mutated)
    assert err.status == Status.CANNOT_UNDERSTAND and "Bits Allocated None" in err.comment


def test_not_dicom_at_all() -> None:
    assert "preamble" in refused(b"hello" * 100).comment
    assert refused(b"\x00" * 128 + b"DICM" + b"\xff" * 40).status == Status.CANNOT_UNDERSTAND


# --------------------------------------------------------------------------- over the network
@contextmanager
def dimse_node(tmp_path: Path, sqlite_url: str, **ingest: object) -> Iterator[tuple[Node, int]]:
    port = free_port()
    settings = make_settings(tmp_path, sqlite_url, storage__fsync="false", dicom__port=port,
                             **{f"ingest__{k}": v for k, v in ingest.items()})
    node = Node.from_settings(settings, migrate=True)
    server = DimseServer(settings.dicom, node.ingestor)
    server.start()
    try:
        yield node, server.port
    finally:
        server.stop()
        node.close()


def c_store(port: int, datasets: list[Dataset], ts: str = str(ExplicitVRLittleEndian)) -> list[tuple[int, str]]:
    ae = AE(ae_title="DECODESCU")
    ae.add_requested_context(CT_IMAGE, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    out = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            out.append((int(status.Status), str(status.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return out


def test_dimse_undecodable_images_are_refused_and_nothing_is_written(tmp_path: Path, sqlite_url: str) -> None:
    good = image(rows=16, cols=16)
    short = image(rows=16, cols=16)
    short.PixelData = short.PixelData[:100]
    jpeg = dcmread(io.BytesIO(encapsulated(image(rows=16, cols=16), JPEGBaseline8Bit, [b"not a jpeg"])))
    with dimse_node(tmp_path, sqlite_url) as (node, port):
        results = c_store(port, [short, good])
        assert results[0][0] == 0xC210 and "undecodable pixel data" in results[0][1]
        assert results[1][0] == 0x0000
        jres = c_store(port, [jpeg], ts=str(JPEGBaseline8Bit))
        assert jres[0][0] == 0xC210 and "JPEG SOI" in jres[0][1]
        assert rows(node) == 1 and len(stored_files(node)) == 1


def test_dimse_deflate_bomb_is_answered_a700(tmp_path: Path, sqlite_url: str) -> None:
    bomb = image()
    bomb.add_new(0x00091010, "LO", "BOMB")
    bomb.add_new(0x00091011, "OB", bytes(4 * 1024 * 1024))
    with dimse_node(tmp_path, sqlite_url, max_inflated_bytes=1024 * 1024) as (node, port):
        results = c_store(port, [bomb], ts=str(DeflatedExplicitVRLittleEndian))
        assert results[0][0] == 0xA700 and "max_inflated_bytes" in results[0][1]
        assert rows(node) == 0 and stored_files(node) == []


def body_of(parts: list[bytes]) -> bytes:
    out = b"".join(
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    )
    return out + b"--" + BOUNDARY.encode() + b"--\r\n"


def test_stow_undecodable_part_fails_with_c210(tmp_path: Path, sqlite_url: str) -> None:
    short = image()
    short.PixelData = short.PixelData[:10]
    good = image()
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, storage__fsync="false"), migrate=True)
    try:
        with TestClient(create_app(node), headers=TEST_AUTH) as client:
            r = client.post("/dicomweb/studies", content=body_of([to_bytes(short), to_bytes(good)]),
                            headers={"Content-Type": CT})
        assert r.status_code == 202
        failed = r.json()["00081198"]["Value"]
        assert [f["00081197"]["Value"][0] for f in failed] == [0xC210]
        assert rows(node) == 1 and len(stored_files(node)) == 1
    finally:
        node.close()


def test_stow_part_count_limit(tmp_path: Path, sqlite_url: str) -> None:
    parts = [to_bytes(image()) for _ in range(5)]
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, storage__fsync="false", ingest__stow_max_parts=3),
                              migrate=True)
    try:
        with TestClient(create_app(node), headers=TEST_AUTH) as client:
            r = client.post("/dicomweb/studies", content=body_of(parts), headers={"Content-Type": CT})
        assert r.status_code == 413
        assert "ingest.stow_max_parts (3)" in r.json()["detail"]
        assert "3 instance(s) before the limit were stored" in r.json()["detail"]
        assert rows(node) == 3
    finally:
        node.close()


def test_stow_content_length_larger_than_the_body_times_out(tmp_path: Path, sqlite_url: str) -> None:
    import threading

    import uvicorn

    node = Node.from_settings(
        make_settings(tmp_path, sqlite_url, storage__fsync="false", ingest__stow_read_timeout=1.0), migrate=True
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        body = body_of([to_bytes(image())])
        token = TEST_AUTH["Authorization"]
        head = (
            f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
            f"Content-Type: {CT}\r\nContent-Length: {len(body) + 5000}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            started = time.monotonic()
            sock.sendall(head + body)  # 5000 bytes short; then silence
            reply = b""
            while b"}" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            waited = time.monotonic() - started
        reply_text = reply.decode("latin-1")
        assert reply_text.startswith("HTTP/1.1 408"), reply_text[:200]
        assert "stow_read_timeout" in reply_text and "1 instance(s) received before were stored" in reply_text
        assert 0.9 <= waited < 10
        assert rows(node) == 1  # the complete part was stored durably
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        node.close()


def test_encode_part10_of_a_checked_bare_data_set_round_trips() -> None:
    ds = image(rows=8, cols=8)
    data = to_bytes(ds)
    meta = parse_meta(data)
    fm_end = data.index(b"DICM") + 4
    fm_len = struct.unpack_from("<L", data, fm_end + 8)[0]
    body = data[fm_end + 12 + fm_len :]
    again = parse_meta(body, transfer_syntax_uid=str(ExplicitVRLittleEndian))
    assert again.sop_uid == meta.sop_uid
    assert dcmread(io.BytesIO(encode_part10(body, again))).SOPInstanceUID == ds.SOPInstanceUID
    assert np.frombuffer(dcmread(io.BytesIO(encode_part10(body, again))).PixelData, np.int16).size == 64


def test_decoder_failure_records_lose_their_traceback() -> None:
    """pydicom logs each failing decoder plugin at ERROR with a traceback
    before it raises; the node refuses the instance itself, so the record
    drops to DEBUG without the traceback (fuzz campaign: 0 ERROR tracebacks)."""
    import logging

    from pacs_node.logging_setup import QuietDecoderFailures

    try:
        raise RuntimeError("libjpeg error code '-1038'")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("pydicom.pixels.decoders.base", logging.ERROR, __file__, 1, "failed", (), exc_info)
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        assert QuietDecoderFailures().filter(record) is False
        assert record.levelno == logging.DEBUG and record.exc_info is None
        other = logging.LogRecord("pacs_node.x", logging.ERROR, __file__, 1, "kept", (), exc_info)
        assert QuietDecoderFailures().filter(other) is True and other.exc_info is not None
    finally:
        root.setLevel(before)


def test_regression_stow_deflate_bomb_is_not_inflated_to_name_it(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench_attacks.py: a 398 KiB STOW-RS deflate bomb grew the node by
    863 MB. The refusal was bounded, but naming the failed part in the
    response read the data set again with pydicom, which inflates it whole.
    Now the File Meta names it and nothing inflates without the limit."""
    import zlib

    def whole_inflate(*_args: object, **_kw: object) -> bytes:
        raise AssertionError("zlib.decompress inflates without a limit")

    bomb = image()
    bomb.add_new(0x00091010, "LO", "BOMB")
    bomb.add_new(0x00091011, "OB", bytes(8 * 1024 * 1024))
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(bomb)
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, storage__fsync="false",
                                            ingest__max_inflated_bytes=1024 * 1024), migrate=True)
    try:
        with TestClient(create_app(node), headers=TEST_AUTH) as client:
            monkeypatch.setattr(zlib, "decompress", whole_inflate)  # after the imports that use it
            r = client.post("/dicomweb/studies", content=body_of([data]), headers={"Content-Type": CT})
        assert r.status_code == 409
        failed = r.json()["00081198"]["Value"]
        assert failed[0]["00081197"]["Value"] == [0xA700]
        assert failed[0]["00081155"]["Value"] == [bomb.SOPInstanceUID]
        assert rows(node) == 0
    finally:
        node.close()
