"""The C-STORE statuses the node answers with, and the refusal that carries one.

Shared by every step of ingest (header, decode check, storage, recording) and
by both front ends: DIMSE answers the status, STOW-RS lists it as the part's
Failure Reason (PS3.18 §10.5.3).
"""

from __future__ import annotations

import enum

__all__ = ["IngestError", "Status"]


class Status(enum.IntEnum):
    """C-STORE statuses the node answers with."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk full, storage or database failure, a size limit
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210  # cannot decode the data set or its pixel data
    INVALID_UID = 0xC211  # missing or malformed Study/Series/SOP Instance UID
    UID_MISMATCH = 0xC212  # data set SOP Instance UID differs from the request
    UID_CONFLICT = 0xC213  # SOP Instance already stored under another study/series
    PROCESSING_FAILURE = 0x0110  # unexpected error (logged with traceback)


class IngestError(Exception):
    """An instance was refused; ``status`` says why (and ``comment`` in words)."""

    def __init__(self, status: Status, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
