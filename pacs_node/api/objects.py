"""The DICOM objects the node serves over WADO-RS and QIDO-RS: the instances it
received (``instances``, files under ``storage.root``) and the results it made
(``outputs``: SEG, SR, anomaly map, overlay, files under the outputs directory
of ``[worker] outputs_dir``, by default ``<data dir>/outputs``).

A result exists on the node only when the worker that made it shares the
node's disk (``[worker] storage = "shared"``, the default local worker); a
remote worker writes its outputs on its own host. Without an outputs
directory on the node (only remote workers) results are left out entirely;
with one, a result row whose file is missing is listed by QIDO-RS (like a
received instance whose file is gone) but cannot be retrieved. A result that
was also delivered back to this node (it is then an ``instances`` row too) is
served once, as received.

The SQL is built with SQLAlchemy expressions only (bound parameters, no string
formatting). :func:`series_rows` and :func:`object_rows` are UNION ALL
subqueries with the same columns for both kinds, so QIDO-RS matches, orders
and pages them in one query.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    Subquery,
    case,
    cast,
    exists,
    func,
    literal,
    null,
    select,
    union_all,
)

from pacs_node.db.models import Instance, Job, Output, Series, Study
from pacs_node.node import Node

__all__ = [
    "StoredObject",
    "find_objects",
    "object_rows",
    "outputs_root",
    "resolve_path",
    "results_on_node",
    "series_rows",
]

logger = logging.getLogger(__name__)

#: ``result`` column: 0 = received instance, 1 = one of the node's own results.
RECEIVED, RESULT = 0, 1
_SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
_KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def _result_modality() -> ColumnElement[str]:
    """Modality of a result from its SOP Class (what highdicom writes: SEG,
    SR, OT for Parametric Map and Secondary Capture)."""
    return case(
        (Output.sop_class_uid.in_(_SEG_CLASSES), "SEG"),
        (Output.sop_class_uid == _KOS_CLASS, "KO"),
        (Output.sop_class_uid.like("1.2.840.10008.5.1.4.1.1.88.%"), "SR"),
        else_="OT",
    )


def _not_received() -> ColumnElement[bool]:
    return ~exists().where(Instance.sop_instance_uid == Output.sop_instance_uid)


def _null_int() -> ColumnElement[int]:
    return cast(null(), Integer)


def _null_str() -> ColumnElement[str]:
    return cast(null(), String(128))


def series_rows(*, results: bool = True) -> Subquery:
    """One row per series (received or result).

    Parameters
    ----------
    results:
        Include the node's results (:func:`results_on_node`).

    Returns
    -------
    Subquery
        Columns ``study_pk``, ``series_uid``, ``modality``, ``series_number``,
        ``series_description``, ``body_part``, ``result``, ``row_id``
        (results: NULL number, description and body part).
    """
    received = select(
        Series.study_id.label("study_pk"),
        Series.series_instance_uid.label("series_uid"),
        Series.modality.label("modality"),
        Series.series_number.label("series_number"),
        Series.series_description.label("series_description"),
        Series.body_part_examined.label("body_part"),
        literal(RECEIVED).label("result"),
        Series.id.label("row_id"),
    )
    made = (
        select(
            Job.study_id.label("study_pk"),
            Output.series_instance_uid.label("series_uid"),
            func.min(_result_modality()).label("modality"),
            _null_int().label("series_number"),
            _null_str().label("series_description"),
            _null_str().label("body_part"),
            literal(RESULT).label("result"),
            func.min(Output.id).label("row_id"),
        )
        .join(Job, Job.id == Output.job_id)
        .where(_not_received())
        .group_by(Job.study_id, Output.series_instance_uid)
    )
    if not results:
        return received.subquery("series_rows")
    return union_all(received, made).subquery("series_rows")


def object_rows(*, results: bool = True) -> Subquery:
    """One row per object (received instance or result).

    Parameters
    ----------
    results:
        Include the node's results (:func:`results_on_node`).

    Returns
    -------
    Subquery
        Columns ``study_pk``, ``series_uid``, ``sop_uid``, ``sop_class_uid``,
        ``transfer_syntax_uid``, ``instance_number``, ``modality``,
        ``series_number``, ``series_description``, ``body_part``, ``path``
        (relative to its root), ``result``, ``row_id``.
    """
    received = select(
        Instance.study_id.label("study_pk"),
        Series.series_instance_uid.label("series_uid"),
        Instance.sop_instance_uid.label("sop_uid"),
        Instance.sop_class_uid.label("sop_class_uid"),
        Instance.transfer_syntax_uid.label("transfer_syntax_uid"),
        Instance.instance_number.label("instance_number"),
        Series.modality.label("modality"),
        Series.series_number.label("series_number"),
        Series.series_description.label("series_description"),
        Series.body_part_examined.label("body_part"),
        Instance.path.label("path"),
        literal(RECEIVED).label("result"),
        Instance.id.label("row_id"),
    ).join(Series, Series.id == Instance.series_id)
    made = (
        select(
            Job.study_id.label("study_pk"),
            Output.series_instance_uid.label("series_uid"),
            Output.sop_instance_uid.label("sop_uid"),
            Output.sop_class_uid.label("sop_class_uid"),
            cast(null(), String(64)).label("transfer_syntax_uid"),
            _null_int().label("instance_number"),
            _result_modality().label("modality"),
            _null_int().label("series_number"),
            _null_str().label("series_description"),
            _null_str().label("body_part"),
            Output.path.label("path"),
            literal(RESULT).label("result"),
            Output.id.label("row_id"),
        )
        .join(Job, Job.id == Output.job_id)
        .where(_not_received())
    )
    if not results:
        return received.subquery("object_rows")
    return union_all(received, made).subquery("object_rows")


def outputs_root(node: Node) -> Path:
    """Directory of the node's results (``[worker] outputs_dir``, by default
    ``<data dir>/outputs``), resolved.

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    Path
        The directory (it may not exist).
    """
    configured = str(node.settings.worker.get("outputs_dir") or "")
    root = Path(configured) if configured else node.settings.data_dir / "outputs"
    return root.resolve()


def results_on_node(node: Node) -> bool:
    """Whether the node has an outputs directory (a worker sharing its disk).

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    bool
        ``False`` when only remote workers run: their results are not here.
    """
    return outputs_root(node).is_dir()


def resolve_path(node: Node, relpath: str, result: int) -> Path | None:
    """Absolute path of an object's file.

    Parameters
    ----------
    node:
        The node.
    relpath:
        ``instances.path`` or ``outputs.path``.
    result:
        The ``result`` column (0 received, 1 result).

    Returns
    -------
    Path or None
        ``None`` for a result whose file is missing or would lie outside the
        outputs directory (received files are always returned: a missing one
        is an error the caller reports).
    """
    if result == RECEIVED:
        try:
            return node.store.path_of(relpath)
        except ValueError:
            logger.warning("instance path outside the storage root skipped")
            return None
    root = outputs_root(node)
    path = (root / relpath).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


@dataclass(frozen=True)
class StoredObject:
    """One object to serve: its UIDs, what SQL knows of it and its file."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    #: ``None`` for results (read the file meta).
    transfer_syntax_uid: str | None
    path: Path
    result: bool


def find_objects(node: Node, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None) -> list[StoredObject]:
    """The objects of a study, series or instance, in series / instance order.

    Parameters
    ----------
    node:
        The node.
    study_uid:
        Study Instance UID (already checked).
    series_uid:
        Restrict to this series.
    sop_uid:
        Restrict to this instance.

    Returns
    -------
    list of StoredObject
        Received instances first, then results.

    Raises
    ------
    HTTPException
        404 when nothing matches.
    """
    o = object_rows(results=results_on_node(node))
    q = (
        select(o.c.series_uid, o.c.sop_uid, o.c.sop_class_uid, o.c.transfer_syntax_uid, o.c.path, o.c.result)
        .join(Study, Study.id == o.c.study_pk)
        .where(Study.study_instance_uid == study_uid)
        .order_by(o.c.result, o.c.series_number.is_(None), o.c.series_number, o.c.series_uid,
                  o.c.instance_number.is_(None), o.c.instance_number, o.c.row_id)
    )
    if series_uid is not None:
        q = q.where(o.c.series_uid == series_uid)
    if sop_uid is not None:
        q = q.where(o.c.sop_uid == sop_uid)
    with node.db.sessionmaker() as s:
        rows = s.execute(q).all()
    out = []
    for row in rows:
        path = resolve_path(node, row.path, row.result)
        if path is not None:
            out.append(StoredObject(study_uid, row.series_uid, row.sop_uid, row.sop_class_uid,
                                    row.transfer_syntax_uid, path, row.result == RESULT))
    if not out:
        raise HTTPException(status_code=404, detail="no such study, series or instance on this node")
    return out
