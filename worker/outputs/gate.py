"""Which dciodvfy errors of an output the node introduced, and which it inherited.

An output copies the patient and study attributes of its source (and some
geometry); an error in one of those is the source's, not the node's. The
gate therefore checks **one instance of each source series once**
(:func:`check_source`) and compares every error line of an output with the
source's (:func:`classify`): a line the source has too is *inherited* and
recorded; only *introduced* lines fail the job. Before that, the values that
can be repaired are repaired in the copy (:mod:`worker.outputs.headers`), so
what is left inherited is what the standard does not let the node change
(an invalid Type 1 value such as a malformed UID).

dciodvfy quotes values (``<Doe^John>``); :func:`redact` removes them from
every line that is stored or logged.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from .headers import keyword_of

__all__ = ["SourceCheck", "check_source", "classify", "flagged_keywords", "redact", "signature"]

log = logging.getLogger(__name__)

#: dciodvfy's summary line after value errors; inherited when the source has it
#: and every other value error of the output is inherited too.
_SUMMARY = "Dicom dataset contains invalid data values for Value Representations"
_VALUE = re.compile(r"(= |value )<[^>]*>")
_MODULE = re.compile(r"\s*Module=<[^>]*>")
_TAG = re.compile(r"\(0x[0-9a-fA-F]{4},0x[0-9a-fA-F]{4}\)")
_ATTRIBUTE = re.compile(r"attribute <([^>]+)>")
_ELEMENT = re.compile(r"Element=<([^>]+)>")


def redact(line: str) -> str:
    """``line`` without the values dciodvfy quotes (they may be patient data)."""
    return _VALUE.sub(lambda m: f"{m.group(1)}<…>", line)


def signature(line: str) -> str:
    """What identifies an error across IODs: the line without its module name, spaces normalised."""
    return " ".join(_MODULE.sub("", line).split())


@dataclass
class SourceCheck:
    """dciodvfy's verdict on one instance of the source series.

    Attributes
    ----------
    dciodvfy:
        The executable used, or ``None`` when the check did not run.
    errors, warnings:
        Its ``Error`` / ``Warning`` lines (not redacted: kept in memory only).
    instance:
        SOP Instance UID of the checked instance.
    """

    dciodvfy: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    instance: str = ""

    @property
    def signatures(self) -> set[str]:
        return {signature(e) for e in self.errors}

    def to_dict(self) -> dict[str, Any]:
        return {
            "dciodvfy": self.dciodvfy or "not available",
            "instance": self.instance,
            "errors": [redact(e) for e in self.errors],
        }


def check_source(source: Any, executable: str | None, timeout: float = 60.0) -> SourceCheck:
    """Run dciodvfy on the first slice's instance of ``source`` as received.

    Parameters
    ----------
    source:
        A :class:`~worker.outputs.source.SourceSeries`.
    executable:
        dciodvfy, or ``None`` (then nothing runs).
    timeout:
        Seconds dciodvfy may take.

    Returns
    -------
    SourceCheck
        Empty when ``executable`` is ``None``.
    """
    from .validate import run_dciodvfy

    uid = source.slices[0].sop_instance_uid
    check = SourceCheck(instance=uid)
    if executable is None:
        return check
    check.dciodvfy = executable
    path = source.source_file(0)
    if path is not None and Path(path).is_file():
        check.errors, check.warnings = run_dciodvfy(path, executable, timeout)
        return check
    # built from data sets in memory: check the instance as received, written to a scratch file
    original = source.originals.get(uid, source.first)
    with tempfile.TemporaryDirectory(prefix="pacs-node-source-") as tmp:
        scratch = Path(tmp) / "source.dcm"
        try:
            pydicom.dcmwrite(scratch, original, enforce_file_format=True)
        except Exception as exc:  # noqa: BLE001 - what cannot be written cannot be checked
            log.warning("source instance could not be written for dciodvfy: %s", type(exc).__name__)
            check.dciodvfy = None
            return check
        check.errors, check.warnings = run_dciodvfy(scratch, executable, timeout)
    return check


def flagged_keywords(check: SourceCheck) -> set[str]:
    """Keywords of the attributes the source check names in its error lines."""
    out: set[str] = set()
    for line in check.errors:
        if "Missing attribute" in line:  # absent, not invalid (missing Type 2 ones are added anyway)
            continue
        for m in _TAG.finditer(line):
            kw = keyword_of(m.group(0))
            if kw:
                out.add(kw)
        for rx in (_ATTRIBUTE, _ELEMENT):
            for m in rx.finditer(line):
                kw = keyword_of(m.group(1)) or (m.group(1) if m.group(1).isidentifier() else None)
                if kw:
                    out.add(kw)
    return out


def classify(errors: Iterable[str], source: SourceCheck | None) -> tuple[list[str], list[str]]:
    """Split an output's dciodvfy error lines into ``(introduced, inherited)``.

    A line is inherited when the source instance has an error line with the
    same :func:`signature`. dciodvfy's summary line about invalid values is
    inherited when the source has it and no value error of the output was
    introduced.
    """
    errors = list(errors)
    if source is None or source.dciodvfy is None:
        return errors, []
    known = source.signatures
    introduced: list[str] = []
    inherited: list[str] = []
    summary: list[str] = []
    for line in errors:
        if _SUMMARY in line:
            summary.append(line)
        elif signature(line) in known:
            inherited.append(line)
        else:
            introduced.append(line)
    value_errors_introduced = any("Value invalid for this VR" in line for line in introduced)
    for line in summary:
        if signature(line) in known and not value_errors_introduced:
            inherited.append(line)
        else:
            introduced.append(line)
    return introduced, inherited
