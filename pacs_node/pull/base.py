"""Errors and results shared by the pull clients (DICOMweb, DIMSE)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pacs_node.ingest.recorder import IngestError, Ingestor, Status

__all__ = [
    "InstanceSink",
    "PullBusyError",
    "PullError",
    "PullReport",
    "SourceError",
    "SourceListing",
    "SourceUnavailableError",
    "StudyNotOnSourceError",
    "ingest_pulled",
]

logger = logging.getLogger(__name__)


class PullError(RuntimeError):
    """A study could not be pulled; ``http_status`` is what the API answers."""

    http_status = 502


class StudyNotOnSourceError(PullError):
    """The source does not hold the study."""

    http_status = 404

    def __init__(self, study_uid: str, source: str) -> None:
        super().__init__(f"study {study_uid} not found on source {source}")
        self.study_uid = study_uid
        self.source = source


class SourceUnavailableError(PullError):
    """The source cannot be reached (connection refused, timeout, association refused)."""

    http_status = 503


class SourceError(PullError):
    """The source answered, but with an error or something unusable."""

    http_status = 502


class PullBusyError(PullError):
    """The same study is being pulled already."""

    http_status = 409


@dataclass(frozen=True)
class SourceListing:
    """What a source says it holds for a study.

    ``instances`` maps SOP Instance UID to SOP Class UID (``None`` when the
    source could only tell a count); ``count`` is NumberOfStudyRelatedInstances
    (or ``len(instances)``).
    """

    study_uid: str
    count: int | None
    instances: dict[str, str] | None = None


@dataclass
class PullReport:
    """What one pull did."""

    source: str
    study_uid: str
    method: str
    expected: int | None = None
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        exp = f" of {self.expected}" if self.expected is not None else ""
        text = (f"pulled {self.received}{exp} instances from {self.source} by {self.method} "
                f"in {self.seconds:.1f} s ({self.stored} new, {self.duplicates} already stored")
        if self.failed:
            text += f", {self.failed} failed"
        return text + ")"

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "study_uid": self.study_uid,
            "method": self.method,
            "expected": self.expected,
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "errors": list(self.errors),
            "seconds": round(self.seconds, 3),
        }


#: Called with each retrieved Part 10 file; returns the DIMSE status to answer.
InstanceSink = Callable[[bytes], int]


def ingest_pulled(ingestor: Ingestor, report: PullReport, study_uid: str, *, calling_aet: str | None,
                  source_label: str = "pull", arrival: str | None = None) -> InstanceSink:
    """An :data:`InstanceSink` that stores retrieved instances of ``study_uid``
    through the node's ingestor (the durability rule holds: the status is
    success only once file and row are committed) and counts them in ``report``;
    ``arrival`` is the pull's arrival key (:mod:`pacs_node.ingest.arrivals`)."""

    def sink(data: bytes) -> int:
        report.received += 1
        try:
            meta = ingestor.parse(data)
            if meta.study_uid != study_uid:
                raise IngestError(Status.INVALID_UID, "instance of another study")
            outcome = ingestor.ingest(data, meta, source=source_label, calling_aet=calling_aet, arrival=arrival)
        except IngestError as exc:
            report.failed += 1
            if len(report.errors) < 20:
                report.errors.append(f"0x{int(exc.status):04X} {exc.comment}")
            logger.warning("pulled instance refused: 0x%04X %s", exc.status, exc.comment)
            return int(exc.status)
        except Exception as exc:  # noqa: BLE001 - answer the peer, keep the pull going
            report.failed += 1
            if len(report.errors) < 20:
                report.errors.append(f"unexpected failure: {exc.__class__.__name__}")
            logger.exception("pulled instance failed unexpectedly")
            return int(Status.PROCESSING_FAILURE)
        if outcome.duplicate:
            report.duplicates += 1
        else:
            report.stored += 1
        return int(Status.SUCCESS)

    return sink
