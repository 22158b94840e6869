"""QIDO-RS query parameters (PS3.18 §8.3.4) and their SQL conditions.

Matching keys, given as keyword (``PatientID``) or tag (``00100020``):

============================  =========================================
kind                          keys and matching
============================  =========================================
UID list                      StudyInstanceUID, SeriesInstanceUID,
                              SOPInstanceUID, SOPClassUID: ``uid`` or
                              ``uid1,uid2`` (or the key repeated)
text (``*`` and ``?``)        PatientID, AccessionNumber, StudyDescription,
                              SeriesDescription, BodyPartExamined:
                              exact, or wildcards (case-sensitive)
person name                   PatientName: as text, case-insensitive
date range                    StudyDate: ``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``,
                              ``-YYYYMMDD``, ``YYYYMMDD-``
codes                         Modality, ModalitiesInStudy: ``CT`` or
                              ``CT,MR`` (or ``CT\\MR``): any of them
integer                       SeriesNumber, InstanceNumber
============================  =========================================

Keys of the level and the levels above it are matched (a series search
matches study keys too). An empty value, or ``*`` alone, is universal
matching: the attribute is returned, nothing is filtered. Any other DICOM
attribute is not indexed: the key is ignored and the answer carries a
``Warning: 299`` header saying so (as for ``fuzzymatching=true``, which is
ignored: matching is literal). An unknown keyword or tag, a malformed value,
``limit`` or ``offset`` is a :class:`QueryError` (400).

The conditions are SQLAlchemy expressions: every value is a bound parameter.
Case-sensitive wildcards use ``LIKE`` on PostgreSQL and ``GLOB`` on SQLite
(whose ``LIKE`` ignores case).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, SQLColumnExpression, func, select

from pacs_node.api.objects import series_rows
from pacs_node.db.models import Study
from pacs_node.ingest.uids import describe_invalid_uid, is_valid_uid

__all__ = [
    "DEFAULT_LIMIT",
    "Level",
    "MAX_LIMIT",
    "Match",
    "QidoQuery",
    "QueryError",
    "conditions",
    "instance_columns",
    "parse_query",
    "series_columns",
    "study_columns",
    "tag_of",
]

Level = Literal["study", "series", "instance"]
Kind = Literal["uid", "text", "name", "date", "codes", "int"]

#: Results per request without ``limit``, and the most one request returns.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_MAX_VALUE = 1024
_RESERVED = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


def _t(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


MODALITIES_IN_STUDY = _t("ModalitiesInStudy")
STUDY_KEYS: dict[int, Kind] = {
    _t("StudyInstanceUID"): "uid", _t("PatientID"): "text", _t("PatientName"): "name",
    _t("AccessionNumber"): "text", _t("StudyDate"): "date", _t("StudyDescription"): "text",
    MODALITIES_IN_STUDY: "codes",
}
SERIES_KEYS: dict[int, Kind] = {
    _t("SeriesInstanceUID"): "uid", _t("Modality"): "codes", _t("SeriesNumber"): "int",
    _t("SeriesDescription"): "text", _t("BodyPartExamined"): "text",
}
INSTANCE_KEYS: dict[int, Kind] = {
    _t("SOPInstanceUID"): "uid", _t("SOPClassUID"): "uid", _t("InstanceNumber"): "int",
}
_LEVEL_KEYS: dict[str, dict[int, Kind]] = {
    "study": STUDY_KEYS,
    "series": {**STUDY_KEYS, **SERIES_KEYS},
    "instance": {**STUDY_KEYS, **SERIES_KEYS, **INSTANCE_KEYS},
}


class QueryError(ValueError):
    """A query parameter that cannot be used (answered 400)."""


@dataclass(frozen=True)
class Match:
    """One matching key: the attribute, how it matches and its parsed values."""

    tag: int
    kind: Kind
    #: uid / codes: the values; text / name: one pattern; date: (low, high)
    #: with "" for an open end; int: one number.
    values: tuple[Any, ...]


@dataclass
class QidoQuery:
    """A parsed QIDO-RS request."""

    level: Level
    matches: list[Match] = field(default_factory=list)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    #: ``limit`` was given (else a truncated answer says so in a Warning).
    explicit_limit: bool = False
    warnings: list[str] = field(default_factory=list)


_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def tag_of(name: str) -> int | None:
    """The tag of a keyword or of 8 hex digits.

    Parameters
    ----------
    name:
        ``PatientID`` or ``00100020``.

    Returns
    -------
    int or None
        The tag, ``None`` when ``name`` is neither.
    """
    if _HEX_TAG.match(name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    return int(tag) if tag is not None else None


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def _split(values: list[str], seps: str) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [x.strip() for x in re.split(f"[{re.escape(seps)}]", v) if x.strip()]
    return out


def _date(value: str, key: str) -> str:
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise QueryError(f"{key}: dates are YYYYMMDD, ranges YYYYMMDD-YYYYMMDD") from None
    return value


def _parse_match(tag: int, kind: Kind, values: list[str]) -> Match:
    key = _name(tag)
    if kind == "uid":
        uids = _split(values, ",\\")
        for uid in uids:
            if not is_valid_uid(uid):
                raise QueryError(f"{key} is not a valid UID ({describe_invalid_uid(uid)})")
        return Match(tag, kind, tuple(uids))
    if kind == "codes":
        return Match(tag, kind, tuple(_split(values, ",\\")))
    if len(values) > 1:
        raise QueryError(f"{key} is given more than once")
    value = values[0]
    if kind == "int":
        if not re.fullmatch(r"[+-]?\d{1,9}", value.strip()):
            raise QueryError(f"{key} takes an integer")
        return Match(tag, kind, (int(value),))
    if kind == "date":
        low, dash, high = value.partition("-")
        if not dash:
            return Match(tag, kind, (_date(low, key), _date(low, key)))
        if not low and not high:
            raise QueryError(f"{key}: a range needs at least one date")
        low, high = (_date(low, key) if low else ""), (_date(high, key) if high else "")
        if low and high and low > high:
            raise QueryError(f"{key}: the range ends before it starts")
        return Match(tag, kind, (low, high))
    return Match(tag, kind, (value,))


def _int_param(values: list[str], name: str, low: int) -> int:
    if len(values) > 1:
        raise QueryError(f"{name} is given more than once")
    if not re.fullmatch(r"\d{1,9}", values[0].strip()) or int(values[0]) < low:
        raise QueryError(f"{name} takes an integer >= {low}")
    return int(values[0])


def _include(q: QidoQuery, values: list[str]) -> None:
    for item in _split(values, ","):
        if item.lower() == "all":
            q.include_all = True
            continue
        tag = tag_of(item.split(".", 1)[0])  # a sequence path: the whole top-level sequence
        if tag is None:
            raise QueryError("includefield takes keywords, tags (8 hex digits) or 'all'")
        q.include.add(tag)


def parse_query(items: list[tuple[str, str]], level: Level) -> QidoQuery:
    """Parse the query string of a search.

    Parameters
    ----------
    items:
        ``request.query_params.multi_items()``.
    level:
        What is searched.

    Returns
    -------
    QidoQuery
        Matching keys, returned attributes, paging and warnings.

    Raises
    ------
    QueryError
        Unknown attribute, malformed value, bad ``limit`` / ``offset``.
    """
    q = QidoQuery(level)
    grouped: dict[str, list[str]] = {}
    for name, value in items:
        if len(value) > _MAX_VALUE:
            raise QueryError(f"the value of {name[:64]!r} is longer than {_MAX_VALUE} characters")
        grouped.setdefault(name, []).append(value)
    keys = _LEVEL_KEYS[level]
    by_tag: dict[int, list[str]] = {}
    for name, values in grouped.items():
        lname = name.lower()
        if lname == "limit":
            q.limit, q.explicit_limit = _int_param(values, "limit", 1), True
            if q.limit > MAX_LIMIT:
                q.warnings.append(f"limit is at most {MAX_LIMIT}: {MAX_LIMIT} results are returned")
                q.limit = MAX_LIMIT
        elif lname == "offset":
            q.offset = _int_param(values, "offset", 0)
        elif lname == "includefield":
            _include(q, values)
        elif lname == "fuzzymatching":
            if any(v.strip().lower() == "true" for v in values):
                q.warnings.append("fuzzymatching is not supported: literal matching was performed")
        else:
            tag = tag_of(name)
            if tag is None:
                raise QueryError(f"{name[:64]!r} is not a DICOM keyword, a tag or a QIDO-RS parameter")
            by_tag.setdefault(tag, []).extend(values)
    for tag, values in by_tag.items():
        q.include.add(tag)
        real = [v for v in values if v.strip() not in ("", "*")]
        if not real:
            continue  # universal matching: return the attribute
        if tag not in keys:
            q.warnings.append(f"matching on {_name(tag)} is not supported: the key was ignored")
            continue
        q.matches.append(_parse_match(tag, keys[tag], real))
    return q


def _wildcard(column: SQLColumnExpression[Any], pattern: str, *, dialect: str, fold: bool) -> ColumnElement[bool]:
    if "*" not in pattern and "?" not in pattern:
        return func.lower(column) == pattern.lower() if fold else column == pattern
    if fold or dialect != "sqlite":
        like = re.sub(r"([\\%_])", r"\\\1", pattern).replace("*", "%").replace("?", "_")
        if fold:
            return func.lower(column).like(like.lower(), escape="\\")
        return column.like(like, escape="\\")
    return column.op("GLOB")(pattern.replace("[", "[[]"))


def _condition(m: Match, column: SQLColumnExpression[Any], dialect: str) -> ColumnElement[bool]:
    if m.kind in ("uid", "codes"):
        return column.in_(list(m.values))
    if m.kind == "int":
        return column == int(m.values[0])
    if m.kind == "date":
        low, high = m.values
        if low == high:
            return column == low
        if low and high:
            return column.between(low, high)
        return column >= low if low else column <= high
    return _wildcard(column, str(m.values[0]), dialect=dialect, fold=m.kind == "name")


def study_columns() -> dict[int, SQLColumnExpression[Any]]:
    """The ``studies`` columns of the study matching keys.

    Returns
    -------
    dict
        Tag -> column (ModalitiesInStudy is matched through the series).
    """
    return {
        _t("StudyInstanceUID"): Study.study_instance_uid, _t("PatientID"): Study.patient_id,
        _t("PatientName"): Study.patient_name, _t("AccessionNumber"): Study.accession_number,
        _t("StudyDate"): Study.study_date, _t("StudyDescription"): Study.study_description,
    }


def series_columns(sub: Any) -> dict[int, SQLColumnExpression[Any]]:
    """The series matching keys' columns of :func:`~pacs_node.api.objects.series_rows`
    or :func:`~pacs_node.api.objects.object_rows`.

    Parameters
    ----------
    sub:
        The subquery.

    Returns
    -------
    dict
        Tag -> column.
    """
    return {
        _t("SeriesInstanceUID"): sub.c.series_uid, _t("Modality"): sub.c.modality,
        _t("SeriesNumber"): sub.c.series_number, _t("SeriesDescription"): sub.c.series_description,
        _t("BodyPartExamined"): sub.c.body_part,
    }


def instance_columns(sub: Any) -> dict[int, SQLColumnExpression[Any]]:
    """The instance matching keys' columns of :func:`~pacs_node.api.objects.object_rows`.

    Parameters
    ----------
    sub:
        The subquery.

    Returns
    -------
    dict
        Tag -> column.
    """
    return {_t("SOPInstanceUID"): sub.c.sop_uid, _t("SOPClassUID"): sub.c.sop_class_uid,
            _t("InstanceNumber"): sub.c.instance_number}


def conditions(q: QidoQuery, columns: Mapping[int, SQLColumnExpression[Any]], dialect: str, *,
               results: bool = True) -> list[ColumnElement[bool]]:
    """WHERE conditions of the query's matching keys.

    Parameters
    ----------
    q:
        The parsed query.
    columns:
        Tag -> column for the keys of the level (``studies`` columns for the
        study keys, subquery columns for the others).
    dialect:
        ``sqlite`` or ``postgresql`` (how case-sensitive wildcards are written).
    results:
        Whether the node's results count for ModalitiesInStudy.

    Returns
    -------
    list
        Conditions to AND; ModalitiesInStudy becomes a subquery on the series.
    """
    out: list[ColumnElement[bool]] = []
    for m in q.matches:
        if m.tag == MODALITIES_IN_STUDY:
            s = series_rows(results=results)
            out.append(Study.id.in_(select(s.c.study_pk).where(s.c.modality.in_(list(m.values)))))
        else:
            out.append(_condition(m, columns[m.tag], dialect))
    return out

