"""Persist one received instance: parse its header, write the file durably,
commit its row. Shared by the DIMSE and STOW-RS front ends so both follow the
same rule: success is reported only after the file *and* the row are durable.

Outcomes carry a DIMSE status (PS3.4 Annex B / PS3.7 Annex C); STOW-RS reuses
them as FailureReason (PS3.18 §10.5.3).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from pacs_node.db.models import Instance, Output, Series, Study, utcnow
from pacs_node.db.session import Database
from pacs_node.ingest.storage import InstanceStore, StorageFullError
from pacs_node.ingest.uids import InvalidUIDError, check_uid

__all__ = [
    "IngestError",
    "IngestOutcome",
    "Ingestor",
    "InstanceMeta",
    "Status",
    "encode_part10",
    "parse_meta",
]

logger = logging.getLogger(__name__)


class Status(enum.IntEnum):
    """C-STORE statuses the node answers with."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk full, storage or database failure
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210  # cannot decode the data set
    INVALID_UID = 0xC211  # missing or malformed Study/Series/SOP Instance UID
    UID_MISMATCH = 0xC212  # data set SOP Instance UID differs from the request
    UID_CONFLICT = 0xC213  # SOP Instance already stored under another study/series
    PROCESSING_FAILURE = 0x0110  # unexpected error (logged with traceback)


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


class IngestError(Exception):
    """An instance was refused; ``status`` says why (and ``comment`` in words)."""

    def __init__(self, status: Status, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class IngestOutcome:
    status: Status
    sop_uid: str
    sop_class_uid: str
    study_uid: str
    duplicate: bool
    relpath: str


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def parse_meta(data: bytes, *, transfer_syntax_uid: str | None = None) -> InstanceMeta:
    """Read the indexed attributes from an encoded instance.

    Parameters
    ----------
    data:
        A DICOM file (preamble + file meta) or, with ``transfer_syntax_uid``,
        a bare data set as received over DIMSE.
    transfer_syntax_uid:
        Transfer syntax of a bare data set.

    Raises
    ------
    IngestError
        ``CANNOT_UNDERSTAND`` when the bytes do not decode,
        ``INVALID_UID`` when a required UID is missing or malformed.
    """
    try:
        if transfer_syntax_uid is None:
            ds: Dataset = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
            if not ds.file_meta or not ts:
                raise IngestError(Status.CANNOT_UNDERSTAND, "not a DICOM file: no File Meta Information")
        else:
            ts = transfer_syntax_uid
            ds = _read_bare(data, ts)
        if not any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")):
            # pydicom reads garbage leniently; a data set with none of the
            # identifying attributes did not decode as DICOM at all.
            raise IngestError(Status.CANNOT_UNDERSTAND, "cannot decode the data set: no identifying attributes")
        sop_class = ds.get("SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID") if ds.file_meta else None)
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
    except IngestError:
        raise
    except InvalidUIDError as exc:
        raise IngestError(Status.INVALID_UID, str(exc)) from None
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise IngestError(Status.CANNOT_UNDERSTAND, f"cannot decode the data set: {exc}"[:200]) from None
    return meta


def _read_bare(data: bytes, ts: str) -> Dataset:
    from pydicom.uid import UID

    uid = UID(ts)
    fh = BytesIO(data)
    from pydicom.filereader import read_dataset

    if uid.is_deflated:
        import zlib

        fh = BytesIO(zlib.decompress(data, -zlib.MAX_WBITS))
    ds = read_dataset(
        fh,
        is_implicit_VR=uid.is_implicit_VR,
        is_little_endian=uid.is_little_endian,
        stop_when=lambda tag, vr, length: tag >= 0x7FE00010,
    )
    ds.file_meta = FileMetaDataset()
    if len(ds) == 0:
        raise ValueError("empty data set")
    return ds


def encode_part10(dataset_bytes: bytes, meta: InstanceMeta, *, implementation_aet: str) -> bytes:
    """Prefix a bare data set with preamble and File Meta Information."""
    fm = FileMetaDataset()
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

    fm.MediaStorageSOPClassUID = UID(meta.sop_class_uid)
    fm.MediaStorageSOPInstanceUID = UID(meta.sop_uid)
    fm.TransferSyntaxUID = UID(meta.transfer_syntax_uid)

    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fm.SourceApplicationEntityTitle = implementation_aet
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, fm, enforce_standard=True)
    buf.write(dataset_bytes)
    return buf.getvalue()


class Ingestor:
    """Stores instances and records them in SQL.

    Parameters
    ----------
    db:
        The node's database.
    store:
        The instance store.
    """

    def __init__(self, db: Database, store: InstanceStore) -> None:
        self.db = db
        self.store = store
        self._upsert = pg_insert if not db.is_sqlite else sqlite_insert

    def ingest(
        self,
        data: bytes,
        meta: InstanceMeta,
        *,
        source: str,
        calling_aet: str | None = None,
    ) -> IngestOutcome:
        """Write ``data`` (a Part 10 file) and commit its row.

        Raises
        ------
        IngestError
            With the status to answer: ``UID_CONFLICT``, ``OUT_OF_RESOURCES``.
        """
        existing = self._lookup(meta.sop_uid)
        if existing is not None and (existing[0], existing[1]) != (meta.study_uid, meta.series_uid):
            raise IngestError(
                Status.UID_CONFLICT,
                "SOP Instance UID already stored under another study/series",
            )
        try:
            stored = self.store.write(meta.study_uid, meta.series_uid, meta.sop_uid, data)
        except InvalidUIDError as exc:
            raise IngestError(Status.INVALID_UID, str(exc)) from None
        except StorageFullError as exc:
            logger.error("storage full, refusing instance: %s", exc)
            raise IngestError(Status.OUT_OF_RESOURCES, "out of resources: storage is full") from None
        except OSError as exc:
            logger.error("storage write failed: %s", exc)
            raise IngestError(Status.OUT_OF_RESOURCES, f"out of resources: storage error ({exc.strerror})") from None
        try:
            duplicate = self._record(meta, stored.relpath, stored.size, stored.sha256, source, calling_aet)
        except IngestError:
            raise
        except (OperationalError, SQLAlchemyError) as exc:
            logger.error("database failure recording instance: %s", exc.__class__.__name__, exc_info=True)
            raise IngestError(Status.OUT_OF_RESOURCES, "out of resources: database unavailable") from None
        return IngestOutcome(
            status=Status.SUCCESS,
            sop_uid=meta.sop_uid,
            sop_class_uid=meta.sop_class_uid,
            study_uid=meta.study_uid,
            duplicate=duplicate,
            relpath=stored.relpath,
        )

    def _lookup(self, sop_uid: str) -> tuple[str, str] | None:
        with self.db.sessionmaker() as s:
            row = s.execute(
                select(Study.study_instance_uid, Series.series_instance_uid)
                .join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id)
                .where(Instance.sop_instance_uid == sop_uid)
            ).first()
            return (row[0], row[1]) if row else None

    def _record(
        self,
        meta: InstanceMeta,
        relpath: str,
        size: int,
        sha256: str,
        source: str,
        calling_aet: str | None,
    ) -> bool:
        """Insert or update rows; returns True for an identical resend."""
        now = utcnow()
        with self.db.session() as s:
            study = self._locked_study(s, meta, calling_aet, now)
            series = self._series(s, study, meta, now)
            inst = s.execute(
                select(Instance).where(Instance.sop_instance_uid == meta.sop_uid).with_for_update()
            ).scalar_one_or_none()
            if inst is not None and inst.series_id != series.id:
                raise IngestError(Status.UID_CONFLICT, "SOP Instance UID already stored under another study/series")
            if inst is not None and inst.sha256 == sha256:
                inst.receive_count += 1
                inst.received_at = now
                logger.info("duplicate instance (identical), count=%d", inst.receive_count)
                return True
            # A new instance, or a changed one: it belongs to the pending
            # version -- unless it is one of the node's own outputs coming
            # back (a PACS forwarding the whole study again), which must not
            # trigger a re-analysis.
            own_output = s.execute(
                select(Output.id).where(Output.sop_instance_uid == meta.sop_uid)
            ).first() is not None
            if not own_output:
                if study.job_version >= study.version:
                    study.version += 1
                    study.version_started_at = now
                study.last_received_at = now
                series.last_received_at = now
            if inst is None:
                study.num_instances += 1
                series.num_instances += 1
                s.add(
                    Instance(
                        series_id=series.id,
                        study_id=study.id,
                        sop_instance_uid=meta.sop_uid,
                        sop_class_uid=meta.sop_class_uid,
                        transfer_syntax_uid=meta.transfer_syntax_uid,
                        instance_number=meta.instance_number,
                        path=relpath,
                        size_bytes=size,
                        sha256=sha256,
                        study_version=study.version,
                        source=source,
                        calling_aet=calling_aet,
                        received_at=now,
                    )
                )
            else:
                inst.sop_class_uid = meta.sop_class_uid
                inst.transfer_syntax_uid = meta.transfer_syntax_uid
                inst.size_bytes = size
                inst.sha256 = sha256
                inst.study_version = study.version
                inst.receive_count += 1
                inst.received_at = now
                logger.info("instance replaced with different content")
            return False

    def _locked_study(self, s: Session, meta: InstanceMeta, calling_aet: str | None, now: dt.datetime) -> Study:
        values: dict[str, Any] = dict(
            study_instance_uid=meta.study_uid,
            patient_id=meta.patient_id,
            patient_name=meta.patient_name,
            accession_number=meta.accession_number,
            study_date=meta.study_date,
            study_description=meta.study_description,
            calling_aet=calling_aet,
            first_received_at=now,
            last_received_at=now,
            version_started_at=now,
            version=1,
            job_version=0,
            num_instances=0,
        )
        s.execute(self._upsert(Study).values(**values).on_conflict_do_nothing(index_elements=["study_instance_uid"]))
        study = s.execute(
            select(Study).where(Study.study_instance_uid == meta.study_uid).with_for_update()
        ).scalar_one()
        return study

    def _series(self, s: Session, study: Study, meta: InstanceMeta, now: dt.datetime) -> Series:
        s.execute(
            self._upsert(Series)
            .values(
                study_id=study.id,
                series_instance_uid=meta.series_uid,
                modality=meta.modality,
                series_number=meta.series_number,
                series_description=meta.series_description,
                body_part_examined=meta.body_part_examined,
                num_instances=0,
                first_received_at=now,
                last_received_at=now,
            )
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        )
        series = s.execute(select(Series).where(Series.series_instance_uid == meta.series_uid)).scalar_one()
        if series.study_id != study.id:
            raise IngestError(Status.UID_CONFLICT, "Series Instance UID already stored under another study")
        return series
