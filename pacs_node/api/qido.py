"""QIDO-RS (PS3.18 §10.6): search the node's studies, series and instances,
received ones and the node's own results (:mod:`pacs_node.api.objects`).

Routes (prefix ``/dicomweb``): ``GET /studies``, ``/studies/{study}/series``,
``/series``, ``/studies/{study}/series/{series}/instances``,
``/studies/{study}/instances``, ``/instances``. Matching keys, ``includefield``,
``limit`` / ``offset``: :mod:`pacs_node.api.qido_query`.

The answer is ``200`` with a DICOM JSON array, ``[]`` when nothing matches
(what Orthanc answers and PS3.18 now specifies; dcm4chee-arc answers 204,
which clients treat alike). Results are ordered newest study first, then by
series and instance number. Without ``limit`` at most 100 results are
returned, with ``limit`` at most 1000; a truncated answer carries
``Warning: 299``.

Matching and counts come from SQL. The other returned attributes (e.g.
StudyTime, PatientBirthDate, Rows) come from one stored header per result
(read without pixel data): a study's and a series' first instance, each
instance's own file (a missing file leaves only what SQL knows).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pacs_node.api.auth import ReadAuth
from pacs_node.api.dicom_json import dataset_json, read_header
from pacs_node.api.dicomweb import AUTH_DOC, DICOM_JSON, PREFIX, base_url, check_path_uids, node_of, require_json
from pacs_node.api.objects import RECEIVED, object_rows, resolve_path, results_on_node, series_rows
from pacs_node.api.qido_query import (
    Level,
    Match,
    QidoQuery,
    QueryError,
    conditions,
    instance_columns,
    parse_query,
    series_columns,
    study_columns,
    tag_of,
)
from pacs_node.db.models import Instance, Study
from pacs_node.node import Node

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix=PREFIX, tags=["dicomweb"])


def _tags(*keywords: str) -> list[int]:
    out = []
    for k in keywords:
        tag = tag_of(k)
        assert tag is not None, k
        out.append(tag)
    return out


# Default attributes of each level (PS3.18 Tables 10.6.3-3, -4, -5), plus
# StudyDescription (what viewers list) and the parents' UIDs.
STUDY_ATTRS = _tags(
    "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
    "ReferringPhysicianName", "TimezoneOffsetFromUTC", "RetrieveURL", "PatientName", "PatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances", "StudyDescription",
)
SERIES_ATTRS = _tags(
    "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "RetrieveURL", "SeriesInstanceUID",
    "SeriesNumber", "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "RequestAttributesSequence", "StudyInstanceUID",
)
INSTANCE_ATTRS = _tags(
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC", "RetrieveURL",
    "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames", "StudyInstanceUID",
    "SeriesInstanceUID",
)
#: What ``includefield=all`` adds at the study and series levels (the
#: instance level adds its whole header; the study level every patient attribute).
STUDY_ALL = _tags(
    "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "AdmittingDiagnosesDescription", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "ProcedureCodeSequence", "ReferencedStudySequence", "IssuerOfAccessionNumberSequence",
)
SERIES_ALL = _tags(
    "SeriesDate", "SeriesTime", "BodyPartExamined", "Laterality", "ProtocolName", "PatientPosition",
    "OperatorsName", "PerformingPhysicianName", "Manufacturer", "ManufacturerModelName", "InstitutionName",
    "StationName", "FrameOfReferenceUID", "ReferencedPerformedProcedureStepSequence",
)
#: Conditional attributes: returned only when there is a value.
_CONDITIONAL = frozenset(_tags(
    "TimezoneOffsetFromUTC", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
))
(_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS, _MODALITIES, _N_STUDY_SERIES, _N_STUDY_INSTANCES,
 _N_SERIES_INSTANCES, _RETRIEVE_URL, _AVAILABILITY) = _tags(
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
    "RetrieveURL", "InstanceAvailability",
)
_PATIENT_ID, _PATIENT_NAME, _ACCESSION, _STUDY_DATE, _STUDY_DESC = _tags(
    "PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyDescription")
_MODALITY, _SERIES_NUMBER, _SERIES_DESC, _BODY_PART, _INSTANCE_NUMBER = _tags(
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "InstanceNumber")

Computed = dict[int, Any]


@dataclass
class _StudyExtra:
    series: int = 0
    instances: int = 0
    modalities: list[str] = field(default_factory=list)
    header: str | None = None


class _Headers:
    """Headers read for one answer (each file once)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._cache: dict[Path, Dataset | None] = {}

    def get(self, relpath: str | None, result: int) -> Dataset | None:
        """The header of a file (``None`` when it is missing or unreadable)."""
        path = resolve_path(self.node, relpath, result) if relpath is not None else None
        if path is None:
            return None
        if path not in self._cache:
            try:
                self._cache[path] = read_header(path).dataset
            except (OSError, InvalidDicomError) as exc:
                logger.warning("QIDO-RS: a stored header is unreadable (%s)", exc.__class__.__name__)
                self._cache[path] = None
        return self._cache[path]


def _study_computed(study: Study, extra: _StudyExtra, base: str) -> Computed:
    return {
        _STUDY_UID: study.study_instance_uid, _PATIENT_ID: study.patient_id, _PATIENT_NAME: study.patient_name,
        _ACCESSION: study.accession_number, _STUDY_DATE: study.study_date, _STUDY_DESC: study.study_description,
        _MODALITIES: extra.modalities or None, _N_STUDY_SERIES: extra.series, _N_STUDY_INSTANCES: extra.instances,
        _RETRIEVE_URL: f"{base}/studies/{study.study_instance_uid}", _AVAILABILITY: "ONLINE",
    }


def _series_computed(row: Any, study_uid: str, count: int, base: str) -> Computed:
    return {
        _STUDY_UID: study_uid, _SERIES_UID: row.series_uid, _MODALITY: row.modality,
        _SERIES_NUMBER: row.series_number, _SERIES_DESC: row.series_description, _BODY_PART: row.body_part,
        _N_SERIES_INSTANCES: count, _RETRIEVE_URL: f"{base}/studies/{study_uid}/series/{row.series_uid}",
    }


def _instance_computed(row: Any, study_uid: str, base: str) -> Computed:
    return {
        _STUDY_UID: study_uid, _SERIES_UID: row.series_uid, _SOP_UID: row.sop_uid, _SOP_CLASS: row.sop_class_uid,
        _INSTANCE_NUMBER: row.instance_number, _AVAILABILITY: "ONLINE",
        _RETRIEVE_URL: f"{base}/studies/{study_uid}/series/{row.series_uid}/instances/{row.sop_uid}",
    }


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return "OW" if " or " in vr and "OW" in vr else vr.split(" or ")[0]


def _compose(defaults: Iterable[int], q: QidoQuery, computed: Computed, header: Dataset | None,
             all_tags: Iterable[int]) -> dict[str, Any]:
    """One result's DICOM JSON: computed values first, then the header's."""
    defaults = set(defaults)
    wanted = defaults | q.include | (set(all_tags) if q.include_all else set())
    ds = Dataset()
    for tag in sorted(wanted):
        value = computed.get(tag)
        if value is not None and value != "":
            ds.add_new(tag, _vr(tag), value)
        elif header is not None and tag in header:
            try:
                ds[tag] = header[tag]
            except Exception as exc:  # noqa: BLE001 - a malformed stored value is left out
                logger.warning("QIDO-RS: %08X left out: %s", tag, exc.__class__.__name__)
        elif tag in defaults and tag not in _CONDITIONAL:
            ds.add_new(tag, _vr(tag), None)
    return dataset_json(ds, bulk_url=None)


def _header_tags(header: Dataset | None, *, patient_only: bool) -> list[int]:
    if header is None:
        return []
    return [int(t) for t in header.keys() if not patient_only or (int(t) >> 16) == 0x0010]


@dataclass
class _Ctx:
    """What one search needs."""

    s: Session
    node: Node
    q: QidoQuery
    base: str
    dialect: str
    #: Results are on this node (:func:`~pacs_node.api.objects.results_on_node`).
    results: bool

    def page(self, query: Select[Any]) -> tuple[list[Any], bool]:
        """The page of rows, and whether more follow."""
        rows = list(self.s.execute(query.limit(self.q.limit + 1).offset(self.q.offset)).all())
        return rows[: self.q.limit], len(rows) > self.q.limit

    def where(self, columns: dict[int, Any]) -> list[Any]:
        """The query's matching conditions."""
        return conditions(self.q, columns, self.dialect, results=self.results)


def _study_extras(ctx: _Ctx, pks: list[int]) -> dict[int, _StudyExtra]:
    """Counts, modalities (received and results) and a header of each study."""
    out: dict[int, _StudyExtra] = defaultdict(_StudyExtra)
    if not pks:
        return out
    sr, o = series_rows(results=ctx.results), object_rows(results=ctx.results)
    for pk, n in ctx.s.execute(select(sr.c.study_pk, func.count()).where(sr.c.study_pk.in_(pks))
                               .group_by(sr.c.study_pk)):
        out[pk].series = n
    for pk, n in ctx.s.execute(select(o.c.study_pk, func.count()).where(o.c.study_pk.in_(pks))
                               .group_by(o.c.study_pk)):
        out[pk].instances = n
    for pk, modality in ctx.s.execute(select(sr.c.study_pk, sr.c.modality).distinct()
                                      .where(sr.c.study_pk.in_(pks), sr.c.modality.is_not(None))
                                      .order_by(sr.c.study_pk, sr.c.modality)):
        out[pk].modalities.append(modality)
    for pk, path in ctx.s.execute(select(Instance.study_id, func.min(Instance.path))
                                  .where(Instance.study_id.in_(pks)).group_by(Instance.study_id)):
        out[pk].header = path
    return out


def _series_extras(ctx: _Ctx, uids: list[str]) -> dict[str, tuple[int, str, int]]:
    """Series UID -> (instances, a file to read the header of, its result flag)."""
    if not uids:
        return {}
    o = object_rows(results=ctx.results)
    rows = ctx.s.execute(select(o.c.series_uid, func.count(), func.min(o.c.path), func.min(o.c.result))
                         .where(o.c.series_uid.in_(uids)).group_by(o.c.series_uid))
    return {uid: (n, path, result) for uid, n, path, result in rows}


def _search_studies(ctx: _Ctx) -> tuple[list[dict[str, Any]], bool]:
    rows, more = ctx.page(select(Study).where(*ctx.where(study_columns())).order_by(Study.id.desc()))
    studies = [r[0] for r in rows]
    extras = _study_extras(ctx, [st.id for st in studies])
    headers = _Headers(ctx.node)
    out = []
    for st in studies:
        extra = extras[st.id]
        header = headers.get(extra.header, RECEIVED)
        out.append(_compose(STUDY_ATTRS, ctx.q, _study_computed(st, extra, ctx.base), header,
                            [*STUDY_ALL, *_header_tags(header, patient_only=True)]))
    return out, more


def _search_series(ctx: _Ctx, with_study: bool) -> tuple[list[dict[str, Any]], bool]:
    sr = series_rows(results=ctx.results)
    query = (select(Study, sr.c.series_uid, sr.c.modality, sr.c.series_number, sr.c.series_description,
                    sr.c.body_part, sr.c.result)
             .join(Study, Study.id == sr.c.study_pk)
             .where(*ctx.where({**study_columns(), **series_columns(sr)}))
             .order_by(Study.id.desc(), sr.c.result, sr.c.series_number.is_(None), sr.c.series_number, sr.c.row_id))
    rows, more = ctx.page(query)
    counts = _series_extras(ctx, [r.series_uid for r in rows])
    studies = _study_extras(ctx, sorted({r.Study.id for r in rows})) if with_study else {}
    headers = _Headers(ctx.node)
    defaults = SERIES_ATTRS + (STUDY_ATTRS if with_study else [])
    all_tags = [*SERIES_ALL, *(STUDY_ALL if with_study else [])]
    out = []
    for r in rows:
        n, path, result = counts.get(r.series_uid, (0, None, r.result))
        computed = _series_computed(r, r.Study.study_instance_uid, n, ctx.base)
        if with_study:
            computed = {**_study_computed(r.Study, studies[r.Study.id], ctx.base), **computed}
        out.append(_compose(defaults, ctx.q, computed, headers.get(path, result), all_tags))
    return out, more


def _search_instances(ctx: _Ctx, *, with_series: bool, with_study: bool) -> tuple[list[dict[str, Any]], bool]:
    o = object_rows(results=ctx.results)
    query = (select(Study, *o.c)
             .join(Study, Study.id == o.c.study_pk)
             .where(*ctx.where({**study_columns(), **series_columns(o), **instance_columns(o)}))
             .order_by(Study.id.desc(), o.c.result, o.c.series_number.is_(None), o.c.series_number, o.c.series_uid,
                       o.c.instance_number.is_(None), o.c.instance_number, o.c.row_id))
    rows, more = ctx.page(query)
    series = _series_extras(ctx, sorted({r.series_uid for r in rows})) if with_series else {}
    studies = _study_extras(ctx, sorted({r.Study.id for r in rows})) if with_study else {}
    headers = _Headers(ctx.node)
    defaults = INSTANCE_ATTRS + (SERIES_ATTRS if with_series else []) + (STUDY_ATTRS if with_study else [])
    out = []
    for r in rows:
        header = headers.get(r.path, r.result)
        study_uid = r.Study.study_instance_uid
        computed = _instance_computed(r, study_uid, ctx.base)
        if with_series:
            count = series[r.series_uid][0] if r.series_uid in series else 0
            computed = {**_series_computed(r, study_uid, count, ctx.base), **computed}
        if with_study:
            computed = {**_study_computed(r.Study, studies[r.Study.id], ctx.base), **computed}
        out.append(_compose(defaults, ctx.q, computed, header, _header_tags(header, patient_only=False)))
    return out, more


def _search(request: Request, level: Level, study_uid: str | None = None,
            series_uid: str | None = None) -> JSONResponse:
    require_json(request)
    check_path_uids(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
    try:
        q = parse_query(list(request.query_params.multi_items()), level)
    except QueryError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    if study_uid is not None:
        q.matches.append(Match(_STUDY_UID, "uid", (study_uid,)))
    if series_uid is not None:
        q.matches.append(Match(_SERIES_UID, "uid", (series_uid,)))
    node = node_of(request)
    with node.db.sessionmaker() as s:
        ctx = _Ctx(s, node, q, base_url(request), str(node.db.engine.dialect.name), results_on_node(node))
        if level == "study":
            out, more = _search_studies(ctx)
        elif level == "series":
            out, more = _search_series(ctx, with_study=study_uid is None)
        else:
            out, more = _search_instances(ctx, with_series=series_uid is None, with_study=study_uid is None)
    warnings = list(q.warnings)
    if more and not q.explicit_limit:
        warnings.append(f"more than {q.limit} results match: ask again with offset={q.offset + q.limit}")
    headers = {"Warning": ", ".join(f'299 pacs-node "{w}"' for w in warnings)} if warnings else None
    logger.info("QIDO-RS %s search: %d result(s)", level, len(out))
    return JSONResponse(out, media_type=DICOM_JSON, headers=headers)


_DOC = {k: v for k, v in AUTH_DOC.items() if k != 404}  # no match: 200 with []


@router.get("/studies", dependencies=[ReadAuth], responses=_DOC, summary="Search for studies (QIDO-RS)")
def search_studies(request: Request) -> JSONResponse:
    """Studies matching the query, as a DICOM JSON array."""
    return _search(request, "study")


@router.get("/studies/{study_uid}/series", dependencies=[ReadAuth], responses=_DOC,
            summary="Search for series of a study (QIDO-RS)")
def search_study_series(study_uid: str, request: Request) -> JSONResponse:
    """Series of one study matching the query."""
    return _search(request, "series", study_uid)


@router.get("/series", dependencies=[ReadAuth], responses=_DOC, summary="Search for series (QIDO-RS)")
def search_series(request: Request) -> JSONResponse:
    """Series of any study matching the query (with their study's attributes)."""
    return _search(request, "series")


@router.get("/studies/{study_uid}/series/{series_uid}/instances", dependencies=[ReadAuth], responses=_DOC,
            summary="Search for instances of a series (QIDO-RS)")
def search_series_instances(study_uid: str, series_uid: str, request: Request) -> JSONResponse:
    """Instances of one series matching the query."""
    return _search(request, "instance", study_uid, series_uid)


@router.get("/studies/{study_uid}/instances", dependencies=[ReadAuth], responses=_DOC,
            summary="Search for instances of a study (QIDO-RS)")
def search_study_instances(study_uid: str, request: Request) -> JSONResponse:
    """Instances of one study matching the query (with their series' attributes)."""
    return _search(request, "instance", study_uid)


@router.get("/instances", dependencies=[ReadAuth], responses=_DOC, summary="Search for instances (QIDO-RS)")
def search_instances(request: Request) -> JSONResponse:
    """Instances of any study matching the query (with study and series attributes)."""
    return _search(request, "instance")
