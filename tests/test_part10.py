"""The node's File Meta encoder against pydicom's writer, and round trips."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from pacs_node.ingest.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    file_meta_bytes,
)
from pacs_node.ingest.recorder import encode_part10, parse_meta
from pacs_node.ingest.uids import InvalidUIDError, is_valid_uid
from dicom_factory import make_instance, to_bytes


def _pydicom(sop_class: str, sop: str, ts: str, aet: str | None) -> bytes:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = UID(sop_class)
    fm.MediaStorageSOPInstanceUID = UID(sop)
    fm.TransferSyntaxUID = UID(ts)
    fm.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    fm.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if aet:
        fm.SourceApplicationEntityTitle = aet
    buf = DicomBytesIO()
    write_file_meta_info(buf, fm, enforce_standard=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("sop", "ts", "aet"),
    [
        ("1.2.3.4", "1.2.840.10008.1.2.1", None),  # even lengths
        ("1.2.3.45", "1.2.840.10008.1.2", "ORTHANC"),  # odd lengths, odd AE
        ("2.25.123456789012345678901234567890123456789", "1.2.840.10008.1.2.4.90", "SIXTEEN_CHARS_AE"),
    ],
)
def test_file_meta_bytes_match_pydicom(sop: str, ts: str, aet: str | None) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ours = file_meta_bytes(sop_class_uid=ct, sop_instance_uid=sop, transfer_syntax_uid=ts, source_aet=aet)
    assert ours == _pydicom(ct, sop, ts, aet)


def test_implementation_identity_is_valid() -> None:
    assert is_valid_uid(IMPLEMENTATION_CLASS_UID)
    assert 0 < len(IMPLEMENTATION_VERSION_NAME) <= 16


def test_encode_part10_round_trip_keeps_the_data_set_bytes() -> None:
    ds = make_instance(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.7")
    whole = to_bytes(ds)
    meta_len = int.from_bytes(whole[140:144], "little")
    bare = whole[144 + meta_len :]
    meta = parse_meta(bare, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    assert meta.sop_uid == ds.SOPInstanceUID
    data = encode_part10(bare, meta, source_aet="STORESCU")
    assert data.startswith(PREAMBLE)
    assert data.endswith(bare)
    back = dcmread(BytesIO(data))
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert back.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.PixelData == ds.PixelData
    assert parse_meta(data) == meta


def test_file_meta_bytes_refuses_bad_input() -> None:
    with pytest.raises(InvalidUIDError):
        file_meta_bytes(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.02.3",
                        transfer_syntax_uid="1.2.840.10008.1.2.1")
    with pytest.raises(ValueError, match="16 ASCII"):
        file_meta_bytes(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", source_aet="X" * 17)
