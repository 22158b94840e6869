"""Read and check the header of a received instance: the indexed attributes
and the decode check (:func:`parse_meta`) and the Part 10 wrapping of a bare
data set (:func:`encode_part10`). A deflated data set is inflated in bounded
steps (``[ingest] max_inflated_bytes``); nothing is written before the header
has been checked.

Shared by the DIMSE and STOW-RS front ends (and pulls); nothing here touches
storage or the database (:mod:`pacs_node.ingest.recorder` does).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from pacs_node.config import IngestSettings
from pacs_node.ingest.errors import IngestError, Status
from pacs_node.ingest.part10 import PREAMBLE, file_meta_bytes
from pacs_node.ingest.uids import InvalidUIDError, check_uid
from pacs_node.ingest.validate import PIXEL_TAGS, check_pixel_data

__all__ = [
    "IngestError",
    "InstanceMeta",
    "Status",
    "encode_part10",
    "parse_meta",
    "read_file_meta",
]

logger = logging.getLogger(__name__)


_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
    "SpecificCharacterSet",
]
#: Only these elements' values are read (others are skipped by length).
_READ_TAGS: list[BaseTag | int] = [Tag(k) for k in (*_HEADER_TAGS, *PIXEL_TAGS)]


@dataclass(frozen=True)
class InstanceMeta:
    """The header attributes the node indexes."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS value as an int, None when absent, unreadable or outside the
    32-bit range IS allows (PS3.5 §6.2): such values are not indexed."""
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    if number is not None and not -(2**31) <= number < 2**31:
        return None
    return number


def parse_meta(
    data: bytes, *, transfer_syntax_uid: str | None = None, checks: IngestSettings | None = None
) -> InstanceMeta:
    """Read the indexed attributes from an encoded instance and check its
    pixel data (:mod:`pacs_node.ingest.validate`).

    Parameters
    ----------
    data:
        A DICOM file (preamble + file meta) or, with ``transfer_syntax_uid``,
        a bare data set as received over DIMSE.
    transfer_syntax_uid:
        Transfer syntax of a bare data set.
    checks:
        ``[ingest]``: the decode check and the inflate limit (defaults when
        None).

    Raises
    ------
    IngestError
        ``CANNOT_UNDERSTAND`` when the bytes or the pixel data do not decode
        (any parse error: truncation, bad lengths, zlib, recursion, overflow,
        unknown VR), ``INVALID_UID`` when a required UID is missing or
        malformed, ``OUT_OF_RESOURCES`` when a deflated data set inflates past
        ``ingest.max_inflated_bytes``.
    """
    checks = checks or _DEFAULT_CHECKS
    try:
        if transfer_syntax_uid is None:
            file_meta, start = read_file_meta(data)
            ts = str(file_meta.get("TransferSyntaxUID", "") or "")
            if not ts:
                raise IngestError(Status.CANNOT_UNDERSTAND, "not a DICOM file: no Transfer Syntax UID in the File Meta")
            check_uid(ts, "TransferSyntaxUID")
            body: bytes | bytearray | memoryview = memoryview(data)[start:]
        else:
            file_meta, ts, body = FileMetaDataset(), transfer_syntax_uid, data
        uid = UID(ts)
        if uid.is_deflated:
            body = _inflate(body, checks.max_inflated_bytes)
        ds, pixel_offset = _read_header(body, uid)
        ds.file_meta = file_meta
        if not any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
            # pydicom reads garbage leniently; a data set with none of the
            # identifying attributes did not decode as DICOM at all.
            raise IngestError(Status.CANNOT_UNDERSTAND, "cannot decode the data set: no identifying attributes")
        sop_class = ds.get("SOPClassUID") or file_meta.get("MediaStorageSOPClassUID")
        meta = InstanceMeta(
            study_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            sop_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=check_uid(sop_class, "SOPClassUID"),
            transfer_syntax_uid=check_uid(ts, "TransferSyntaxUID"),
            patient_id=_text(ds, "PatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            accession_number=_text(ds, "AccessionNumber", 64),
            study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 128),
            modality=_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 128),
            body_part_examined=_text(ds, "BodyPartExamined", 64),
            instance_number=_int(ds, "InstanceNumber"),
        )
        check_pixel_data(ds, body, pixel_offset, transfer_syntax_uid=ts, mode=checks.decode_check)
    except IngestError:
        raise
    except InvalidUIDError as exc:
        raise IngestError(Status.INVALID_UID, str(exc)) from None
    except RecursionError:
        raise IngestError(Status.CANNOT_UNDERSTAND, "cannot decode the data set: sequences nested too deeply") from None
    except MemoryError:
        raise IngestError(Status.OUT_OF_RESOURCES, "out of resources: the data set does not fit in memory") from None
    except Exception as exc:  # noqa: BLE001 - parsing is pure: any failure means undecodable
        # zlib.error, struct.error, OverflowError ("1e400"), NotImplementedError
        # (unknown VR), InvalidDicomError, EOFError, ValueError, ...: the
        # peer's bytes, not the node, are at fault. The comment names the
        # exception type and pydicom's message (which names tags, not values).
        raise IngestError(
            Status.CANNOT_UNDERSTAND, f"cannot decode the data set: {exc.__class__.__name__}: {exc}"[:200]
        ) from None
    return meta


_DEFAULT_CHECKS = IngestSettings()
#: The header is read up to the first pixel data element (Float, Double Float or Pixel Data).
_PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))


def read_file_meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """The File Meta group of a Part 10 file and where the data set starts.

    Raises
    ------
    IngestError
        ``CANNOT_UNDERSTAND`` without the preamble and ``DICM`` prefix; a
        malformed group raises pydicom's own errors.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise IngestError(Status.CANNOT_UNDERSTAND, "not a DICOM file: no preamble and DICM prefix")
    fp = BytesIO(data)
    fp.seek(132)
    group = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, vr, length: tag.group != 2)
    return FileMetaDataset(group), fp.tell()


def _inflate(data: bytes | bytearray | memoryview, limit: int) -> bytearray:
    """Inflate a deflated data set (PS3.5 §A.5) in bounded steps."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: bytes | bytearray | memoryview = data
    while pending and not inflater.eof:
        out += inflater.decompress(pending, _INFLATE_STEP)
        if len(out) > limit:
            raise IngestError(
                Status.OUT_OF_RESOURCES,
                f"deflated data set exceeds ingest.max_inflated_bytes ({limit} bytes)",
            )
        pending = inflater.unconsumed_tail
    if not inflater.eof:
        raise IngestError(Status.CANNOT_UNDERSTAND, "cannot decode the data set: the deflate stream is truncated")
    return out  # not copied into bytes: up to max_inflated_bytes


_INFLATE_STEP = 4 * 1024 * 1024


def _read_header(body: bytes | bytearray | memoryview, uid: UID) -> tuple[Dataset, int]:
    """The data set up to its pixel data, and the offset where pixel data starts."""
    fp = BytesIO(body)
    ds = read_dataset(
        fp,
        is_implicit_VR=uid.is_implicit_VR,
        is_little_endian=uid.is_little_endian,
        # Exactly at a pixel data element: a data set whose tags are out of
        # order (a mutated tag above 7FE0) is read on, as pydicom's own
        # reader does, so nothing is hidden behind it.
        stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS,
        specific_tags=_READ_TAGS,
    )
    return ds, fp.tell()


def encode_part10(dataset_bytes: bytes, meta: InstanceMeta, *, source_aet: str | None = None) -> bytes:
    """Prefix a bare data set with preamble and File Meta Information.

    Raises
    ------
    InvalidUIDError
        When a UID of ``meta`` does not follow the UID grammar.
    """
    fm = file_meta_bytes(
        sop_class_uid=meta.sop_class_uid,
        sop_instance_uid=meta.sop_uid,
        transfer_syntax_uid=meta.transfer_syntax_uid,
        source_aet=source_aet,
    )
    return b"".join((PREAMBLE, fm, dataset_bytes))
