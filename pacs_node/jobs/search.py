"""Search conditions over studies for the study and job lists.

Every value is bound as a parameter of the SQL statement (never pasted into
it). Matching follows DICOM query rules where they help an operator:

* ``*`` matches any run of characters and ``?`` one character; ``%``, ``_``
  and ``\\`` typed by the user are literal.
* Patient name and patient ID are compared case-insensitively; without a
  wildcard a value matches the names and IDs that start with it (``smith``
  finds ``Smith^John``).
* Accession number and Study Instance UID match exactly unless the value holds
  a wildcard.
* Study date: ``YYYYMMDD``, or a range ``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-``,
  ``-YYYYMMDD`` (both ends included); ``YYYY-MM-DD`` is accepted as well.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_
from sqlalchemy.orm import InstrumentedAttribute

from pacs_node.db.models import Study

__all__ = ["StudyFilter", "date_condition", "like_pattern", "match_condition"]

logger = logging.getLogger(__name__)

_ESCAPE = "\\"
_DATE = re.compile(r"^\d{8}$")
_MAX_VALUE = 128


def like_pattern(value: str, *, prefix: bool = False) -> tuple[str, bool]:
    """Translate a DICOM-style wildcard value into a SQL ``LIKE`` pattern.

    Parameters
    ----------
    value:
        The user's value (``*`` and ``?`` are wildcards).
    prefix:
        Without any wildcard, match values that start with ``value``.

    Returns
    -------
    tuple of (str, bool)
        The pattern (escape character ``\\``) and whether it holds a
        wildcard (False: the value can be compared for equality).
    """
    out: list[str] = []
    wild = False
    for ch in value:
        if ch == "*":
            out.append("%")
            wild = True
        elif ch == "?":
            out.append("_")
            wild = True
        elif ch in ("%", "_", _ESCAPE):
            out.append(_ESCAPE + ch)
        else:
            out.append(ch)
    if prefix and not wild:
        out.append("%")
        wild = True
    return "".join(out), wild


def match_condition(column: InstrumentedAttribute[Any], value: str, *, fold_case: bool = False,
                    prefix: bool = False) -> ColumnElement[bool]:
    """``column`` matches ``value`` (wildcards as in :func:`like_pattern`).

    Parameters
    ----------
    column:
        A string column.
    value:
        The user's value.
    fold_case:
        Compare case-insensitively.
    prefix:
        Without a wildcard, match values starting with ``value``.

    Returns
    -------
    ColumnElement
        The condition, with ``value`` bound as a parameter.
    """
    pattern, wild = like_pattern(value, prefix=prefix)
    left: Any = func.lower(column) if fold_case else column
    if not wild:
        return left == (value.lower() if fold_case else value)
    return left.like(pattern.lower() if fold_case else pattern, escape=_ESCAPE)


def _date(value: str) -> str:
    text = value.strip()
    if len(text) == 10 and text[4] == "-" and text[7] == "-":  # YYYY-MM-DD
        text = text.replace("-", "")
    if not _DATE.match(text):
        raise ValueError(f"not a date (YYYYMMDD): {value[:20]!r}")
    return text


def date_condition(column: InstrumentedAttribute[Any], value: str) -> ColumnElement[bool]:
    """``column`` (DICOM DA, ``YYYYMMDD``) lies in the date or range ``value``.

    Parameters
    ----------
    column:
        A DA column.
    value:
        ``YYYYMMDD``, ``YYYY-MM-DD`` or a range ``A-B``, ``A-``, ``-B``.

    Returns
    -------
    ColumnElement
        The condition.

    Raises
    ------
    ValueError
        When ``value`` is not a date or a range of dates.
    """
    v = value.strip()
    if "-" not in v or (len(v) == 10 and v[4] == "-" and v[7] == "-"):
        return column == _date(v)
    lo, _, hi = v.partition("-")
    if not lo and not hi:
        raise ValueError("a date range needs at least one end")
    conds = []
    if lo:
        conds.append(column >= _date(lo))
    if hi:
        conds.append(column <= _date(hi))
    return and_(*conds)


@dataclass(frozen=True)
class StudyFilter:
    """What the study and job lists are narrowed to (empty: everything).

    Attributes
    ----------
    patient:
        Patient name or patient ID.
    accession:
        Accession number.
    study_uid:
        Study Instance UID.
    date:
        Study date or date range.
    """

    patient: str | None = None
    accession: str | None = None
    study_uid: str | None = None
    date: str | None = None

    def __post_init__(self) -> None:
        for name in ("patient", "accession", "study_uid", "date"):
            value = getattr(self, name)
            if value is not None and len(value) > _MAX_VALUE:
                raise ValueError(f"{name}: at most {_MAX_VALUE} characters")
        if self.date:
            date_condition(Study.study_date, self.date)  # raises ValueError early

    def conditions(self) -> list[ColumnElement[bool]]:
        """The SQL conditions on :class:`~pacs_node.db.models.Study` columns.

        Returns
        -------
        list of ColumnElement
            To be combined with ``AND``; empty without criteria.
        """
        out: list[ColumnElement[bool]] = []
        if self.patient:
            out.append(or_(
                match_condition(Study.patient_name, self.patient, fold_case=True, prefix=True),
                match_condition(Study.patient_id, self.patient, fold_case=True, prefix=True),
            ))
        if self.accession:
            out.append(match_condition(Study.accession_number, self.accession))
        if self.study_uid:
            out.append(match_condition(Study.study_instance_uid, self.study_uid))
        if self.date:
            out.append(date_condition(Study.study_date, self.date))
        return out
