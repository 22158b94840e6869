"""Persist one received instance: parse its header, write the file durably,
commit its row. Shared by the DIMSE and STOW-RS front ends so both follow the
same rule: success is reported only after the file *and* the row are durable.

Outcomes carry a DIMSE status (PS3.4 Annex B / PS3.7 Annex C); STOW-RS reuses
them as FailureReason (PS3.18 §10.5.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from pacs_node.config import IngestSettings
from pacs_node.db.models import Instance, Output, Series, Study, utcnow
from pacs_node.db.session import Database, GroupCommit
from pacs_node.ingest.arrivals import ArrivalTracker
from pacs_node.ingest.header import IngestError, InstanceMeta, Status, encode_part10, parse_meta
from pacs_node.ingest.storage import InstanceStore, StorageFullError
from pacs_node.ingest.uids import InvalidUIDError

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


@dataclass(frozen=True)
class IngestOutcome:
    status: Status
    sop_uid: str
    sop_class_uid: str
    study_uid: str
    duplicate: bool
    relpath: str


class Ingestor:
    """Stores instances and records them in SQL.

    Parameters
    ----------
    db:
        The node's database.
    store:
        The instance store.
    checks:
        ``[ingest]``: decode check and inflate limit, applied by :meth:`parse`
        (defaults when None).
    """

    def __init__(self, db: Database, store: InstanceStore, checks: IngestSettings | None = None) -> None:
        self.db = db
        self.store = store
        self.checks = checks or IngestSettings()
        dialect = "sqlite" if db.is_sqlite else "postgresql"
        self._study_upsert = _STUDY_UPSERT[dialect]
        self._series_upsert = _SERIES_UPSERT[dialect]
        # Rows of instances received concurrently (several associations,
        # STOW-RS requests) are committed together: one commit per batch.
        self._commits = GroupCommit(db.engine)
        #: Which association / request / pull brought each study, and how it
        #: ended (:mod:`pacs_node.ingest.arrivals`).
        self.arrivals = ArrivalTracker(db, self._commits)

    def parse(self, data: bytes, *, transfer_syntax_uid: str | None = None) -> InstanceMeta:
        """Read and check the header and pixel data of a received instance
        (:func:`~pacs_node.ingest.header.parse_meta` with this node's ``[ingest]``).

        Raises
        ------
        IngestError
            ``CANNOT_UNDERSTAND``, ``INVALID_UID`` or ``OUT_OF_RESOURCES``.
        """
        return parse_meta(data, transfer_syntax_uid=transfer_syntax_uid, checks=self.checks)

    def ingest(
        self,
        data: bytes,
        meta: InstanceMeta,
        *,
        source: str,
        calling_aet: str | None = None,
        arrival: str | None = None,
    ) -> IngestOutcome:
        """Write ``data`` (a Part 10 file) and commit its row.

        ``arrival`` is the key of the association, STOW-RS request or pull
        that brought it (:meth:`ArrivalTracker.new_key`); its ``arrivals``
        row is written in the same commit.

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
            duplicate = self._record(meta, stored.relpath, stored.size, stored.sha256, source, calling_aet, arrival)
        except IngestError:
            raise
        except (OperationalError, SQLAlchemyError) as exc:
            logger.error("database failure recording instance: %s", exc.__class__.__name__, exc_info=True)
            raise IngestError(Status.OUT_OF_RESOURCES, "out of resources: database unavailable") from None
        if arrival is not None:
            self.arrivals.stored(arrival)
        return IngestOutcome(
            status=Status.SUCCESS,
            sop_uid=meta.sop_uid,
            sop_class_uid=meta.sop_class_uid,
            study_uid=meta.study_uid,
            duplicate=duplicate,
            relpath=stored.relpath,
        )

    # The hot path uses SQLAlchemy Core statements built once (module level,
    # with bind parameters, so their cache keys and compiled forms are reused),
    # not the ORM: per instance the unit of work, identity map and attribute
    # instrumentation cost more CPU than the SQL itself. Same rows, same
    # locks: the study row is locked (PostgreSQL: ON CONFLICT DO UPDATE /
    # FOR UPDATE; SQLite: BEGIN IMMEDIATE) before its version is read.

    def _lookup(self, sop_uid: str) -> tuple[str, str] | None:
        with self.db.read_connection() as conn:
            row = conn.execute(_LOOKUP, {"sop": sop_uid}).first()
            return (row[0], row[1]) if row else None

    def _record(
        self,
        meta: InstanceMeta,
        relpath: str,
        size: int,
        sha256: str,
        source: str,
        calling_aet: str | None,
        arrival: str | None = None,
    ) -> bool:
        """Insert or update rows and commit; returns True for an identical resend."""
        return self._commits.run(
            lambda conn: self._record_rows(conn, meta, relpath, size, sha256, source, calling_aet, arrival)
        )

    def _record_rows(
        self,
        conn: Connection,
        meta: InstanceMeta,
        relpath: str,
        size: int,
        sha256: str,
        source: str,
        calling_aet: str | None,
        arrival: str | None = None,
    ) -> bool:
        now = utcnow()
        study = conn.execute(
            self._study_upsert,
            dict(
                study_instance_uid=meta.study_uid,
                patient_id=meta.patient_id,
                patient_name=meta.patient_name,
                accession_number=meta.accession_number,
                study_date=meta.study_date,
                study_description=meta.study_description,
                calling_aet=calling_aet,
                now=now,
            ),
        ).one()
        study_id, version = int(study.id), int(study.version)
        if arrival is not None:
            # Every stored instance, duplicates included: a complete resend
            # is what clears an interruption.
            self.arrivals.record(conn, key=arrival, study_id=study_id, source=source,
                                 calling_aet=calling_aet, now=now)
        series = conn.execute(
            self._series_upsert,
            dict(
                study_id=study_id,
                series_instance_uid=meta.series_uid,
                modality=meta.modality,
                series_number=meta.series_number,
                series_description=meta.series_description,
                body_part_examined=meta.body_part_examined,
                now=now,
            ),
        ).one()
        if series.study_id != study_id:
            raise IngestError(Status.UID_CONFLICT, "Series Instance UID already stored under another study")
        series_id = int(series.id)
        inst = conn.execute(_INSTANCE_FOR_UPDATE, {"sop": meta.sop_uid}).first()
        if inst is not None and inst.series_id != series_id:
            raise IngestError(Status.UID_CONFLICT, "SOP Instance UID already stored under another study/series")
        if inst is not None and inst.sha256 == sha256:
            conn.execute(_INSTANCE_RESENT, {"iid": inst.id, "count": inst.receive_count + 1, "now": now})
            logger.info("duplicate instance (identical), count=%d", inst.receive_count + 1)
            return True
        # A new instance, or a changed one: it belongs to the pending
        # version -- unless it is one of the node's own outputs coming
        # back (a PACS forwarding the whole study again), which must not
        # trigger a re-analysis.
        own_output = conn.execute(_OWN_OUTPUT, {"sop": meta.sop_uid}).first() is not None
        added = 1 if inst is None else 0
        if not own_output:
            if int(study.job_version) >= version:
                version += 1
                conn.execute(_STUDY_NEW_VERSION, {"sid": study_id, "version": version, "now": now, "added": added})
            else:
                conn.execute(_STUDY_RECEIVED, {"sid": study_id, "now": now, "added": added})
            conn.execute(_SERIES_RECEIVED, {"sid": series_id, "now": now, "added": added})
        elif added:
            conn.execute(_STUDY_COUNT, {"sid": study_id})
            conn.execute(_SERIES_COUNT, {"sid": series_id})
        if inst is None:
            conn.execute(
                _INSTANCE_INSERT,
                dict(
                    series_id=series_id,
                    study_id=study_id,
                    sop_instance_uid=meta.sop_uid,
                    sop_class_uid=meta.sop_class_uid,
                    transfer_syntax_uid=meta.transfer_syntax_uid,
                    instance_number=meta.instance_number,
                    path=relpath,
                    size_bytes=size,
                    sha256=sha256,
                    study_version=version,
                    source=source,
                    calling_aet=calling_aet,
                    received_at=now,
                    receive_count=1,
                ),
            )
        else:
            conn.execute(
                _INSTANCE_REPLACED,
                dict(
                    iid=inst.id,
                    sop_class_uid=meta.sop_class_uid,
                    transfer_syntax_uid=meta.transfer_syntax_uid,
                    size_bytes=size,
                    sha256=sha256,
                    study_version=version,
                    count=inst.receive_count + 1,
                    now=now,
                ),
            )
            logger.info("instance replaced with different content")
        return False


_S = cast(Table, Study.__table__)
_SE = cast(Table, Series.__table__)
_I = cast(Table, Instance.__table__)
_O = cast(Table, Output.__table__)


def _study_upsert(insert_fn: Any) -> Any:
    """Create the study if missing and lock its row; RETURNING id, version, job_version."""
    now = bindparam("now", type_=_S.c.first_received_at.type)
    stmt = insert_fn(_S).values(
        study_instance_uid=bindparam("study_instance_uid"),
        patient_id=bindparam("patient_id"),
        patient_name=bindparam("patient_name"),
        accession_number=bindparam("accession_number"),
        study_date=bindparam("study_date"),
        study_description=bindparam("study_description"),
        calling_aet=bindparam("calling_aet"),
        first_received_at=now,
        last_received_at=now,
        version_started_at=now,
        version=1,
        job_version=0,
        num_instances=0,
    )
    # A no-op update instead of DO NOTHING: the row is returned (and, on
    # PostgreSQL, locked like SELECT ... FOR UPDATE) in the same statement.
    return stmt.on_conflict_do_update(
        index_elements=["study_instance_uid"], set_={"version": _S.c.version}
    ).returning(_S.c.id, _S.c.version, _S.c.job_version)


def _series_upsert(insert_fn: Any) -> Any:
    now = bindparam("now", type_=_SE.c.first_received_at.type)
    stmt = insert_fn(_SE).values(
        study_id=bindparam("study_id"),
        series_instance_uid=bindparam("series_instance_uid"),
        modality=bindparam("modality"),
        series_number=bindparam("series_number"),
        series_description=bindparam("series_description"),
        body_part_examined=bindparam("body_part_examined"),
        num_instances=0,
        first_received_at=now,
        last_received_at=now,
    )
    return stmt.on_conflict_do_update(
        index_elements=["series_instance_uid"], set_={"study_id": _SE.c.study_id}
    ).returning(_SE.c.id, _SE.c.study_id)


_STUDY_UPSERT = {"sqlite": _study_upsert(sqlite_insert), "postgresql": _study_upsert(pg_insert)}
_SERIES_UPSERT = {"sqlite": _series_upsert(sqlite_insert), "postgresql": _series_upsert(pg_insert)}
_LOOKUP = (
    select(_S.c.study_instance_uid, _SE.c.series_instance_uid)
    .select_from(_I.join(_SE, _I.c.series_id == _SE.c.id).join(_S, _SE.c.study_id == _S.c.id))
    .where(_I.c.sop_instance_uid == bindparam("sop"))
)
_INSTANCE_FOR_UPDATE = (
    select(_I.c.id, _I.c.series_id, _I.c.sha256, _I.c.receive_count)
    .where(_I.c.sop_instance_uid == bindparam("sop"))
    .with_for_update()
)
_OWN_OUTPUT = select(_O.c.id).where(_O.c.sop_instance_uid == bindparam("sop")).limit(1)
_NOW_S = bindparam("now", type_=_S.c.last_received_at.type)
_NOW_SE = bindparam("now", type_=_SE.c.last_received_at.type)
_NOW_I = bindparam("now", type_=_I.c.received_at.type)
_STUDY_NEW_VERSION = (
    update(_S)
    .where(_S.c.id == bindparam("sid"))
    .values(version=bindparam("version"), version_started_at=_NOW_S, last_received_at=_NOW_S,
            num_instances=_S.c.num_instances + bindparam("added"))
)
_STUDY_RECEIVED = (
    update(_S)
    .where(_S.c.id == bindparam("sid"))
    .values(last_received_at=_NOW_S, num_instances=_S.c.num_instances + bindparam("added"))
)
_STUDY_COUNT = update(_S).where(_S.c.id == bindparam("sid")).values(num_instances=_S.c.num_instances + 1)
_SERIES_RECEIVED = (
    update(_SE)
    .where(_SE.c.id == bindparam("sid"))
    .values(last_received_at=_NOW_SE, num_instances=_SE.c.num_instances + bindparam("added"))
)
_SERIES_COUNT = update(_SE).where(_SE.c.id == bindparam("sid")).values(num_instances=_SE.c.num_instances + 1)
_INSTANCE_INSERT = insert(_I).values({c: bindparam(c, type_=_I.c[c].type) for c in (
    "series_id", "study_id", "sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "instance_number", "path",
    "size_bytes", "sha256", "study_version", "source", "calling_aet", "received_at", "receive_count")})
_INSTANCE_RESENT = (
    update(_I).where(_I.c.id == bindparam("iid")).values(receive_count=bindparam("count"), received_at=_NOW_I)
)
_INSTANCE_REPLACED = (
    update(_I)
    .where(_I.c.id == bindparam("iid"))
    .values(
        sop_class_uid=bindparam("sop_class_uid"),
        transfer_syntax_uid=bindparam("transfer_syntax_uid"),
        size_bytes=bindparam("size_bytes"),
        sha256=bindparam("sha256"),
        study_version=bindparam("study_version"),
        receive_count=bindparam("count"),
        received_at=_NOW_I,
    )
)
