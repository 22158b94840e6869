"""Invalid values the outputs would copy from the source, and their repair.

highdicom copies the root attributes of the source's Patient and Study
modules (Patient, Clinical Trial Subject, General Study, Patient Study,
Clinical Trial Study) into every SEG, Parametric Map, SR and overlay. Real
archives hold values those attributes may not have: Patient's Age "42" (AS
needs "042Y"), Study Date "2026-01-01" (DA is YYYYMMDD), a lowercase or
over-long Code String, an over-long LO or SH. Copied as they are, the
node's outputs fail their own validation for an error that is not theirs.

:func:`fix_headers` repairs each such value in the copy the outputs are
built from, the way PS3.5 allows, and never changes the source files:

* an invalid **Type 3** attribute (optional) is removed;
* an invalid **Type 2** attribute (required, may be empty) is emptied;
* a missing Type 2 attribute of the Patient and General Study modules is
  added empty;
* an invalid **Type 1** attribute (Study Instance UID, ...) cannot be
  repaired: it is kept, recorded, and the validation gate reports the error
  as inherited from the source.

Every change is a :class:`HeaderFix` that names the attribute and the rule it
broke, never the value (that is patient data).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.valuerep import MAX_VALUE_LEN, validate_value

__all__ = ["TYPE2_REQUIRED", "HeaderFix", "copied_attributes", "fix_headers", "invalid_reason", "keyword_of"]

#: Type 2 attributes of the Patient and General Study modules every output
#: needs (highdicom reads some with attribute access): added empty when missing.
TYPE2_REQUIRED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)

#: Enumerated values (PS3.3) of copied attributes that dciodvfy checks.
_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
}

#: Repaired even with ``repair=False``: highdicom refuses to build an object
#: from these invalid values (``PatientSexValues``, DA and TM conversion).
_ALWAYS_REPAIR = frozenset({"PatientSex", "PatientBirthDate", "StudyDate", "StudyTime"})

#: What a value of the VR must look like (for the record; no value is named).
_FORMS = {
    "AS": "nnnD, nnnW, nnnM or nnnY",
    "DA": "YYYYMMDD",
    "TM": "HHMMSS.FFFFFF",
    "DT": "YYYYMMDDHHMMSS.FFFFFF&ZZXX",
    "CS": "upper-case letters, digits, space and underscore",
    "DS": "a decimal string of at most 16 characters",
    "IS": "an integer string of at most 12 characters",
    "UI": "digits and dots",
    "PN": "at most 64 characters per component group",
}
_STRICT = {
    # pydicom accepts query ranges ("20260101-"); a stored value may not be one
    "DA": re.compile(r"^\d{8}$"),
    "TM": re.compile(r"^([01]\d|2[0-3])([0-5]\d((60|[0-5]\d)(\.\d{1,6})?)?)? *$"),
}

#: Modules highdicom copies into every output (``SOPClass.copy_patient_and_study_information``).
_COPIED_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")


@dataclass(frozen=True)
class HeaderFix:
    """One change made to the copy of the source header the outputs are built from.

    Attributes
    ----------
    keyword, tag:
        The attribute (``"PatientAge"``, ``"(0010,1010)"``).
    type:
        Its Type in the module the outputs copy it from (``"1"``, ``"2"``,
        ``"3"``, ``"1C"``, ``"2C"``).
    action:
        ``"removed"`` (Type 3), ``"emptied"`` (Type 2), ``"added empty"``
        (missing Type 2) or ``"kept"`` (Type 1: cannot be repaired).
    reason:
        The rule the value broke (never the value).
    """

    keyword: str
    tag: str
    type: str
    action: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"attribute": self.keyword, "tag": self.tag, "type": self.type, "action": self.action,
                "reason": self.reason}


@lru_cache(maxsize=1)
def _module_types() -> dict[str, str]:
    """Keyword -> Type of every root attribute of the copied modules."""
    # highdicom's own tables of the standard (the same ones it copies by);
    # a private module of the pinned highdicom (<0.29).
    from highdicom._standard_utils import get_module_attribute_map

    modules = get_module_attribute_map()
    types: dict[str, str] = {}
    for key in _COPIED_MODULES:
        for item in modules.get(key, []):
            if not item["path"]:
                types.setdefault(str(item["keyword"]), str(item["type"]))
    return types


def copied_attributes() -> dict[str, str]:
    """Keyword -> Type of the source attributes the outputs copy."""
    return dict(_module_types())


def _tag_text(tag: int) -> str:
    t = Tag(tag)
    return f"({t.group:04X},{t.element:04X})"


def _value_reason(vr: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if vr in _STRICT and isinstance(value, str) and not _STRICT[vr].match(value):
        return f"not a valid {vr} value ({_FORMS[vr]})"
    try:
        validate_value(vr, value, config.RAISE)
    except ValueError as exc:
        text = str(exc)
        if "exceeds the maximum length" in text:
            limit = MAX_VALUE_LEN.get(vr)
            return f"{vr} value longer than {limit} characters" if limit else f"{vr} value too long"
        return f"not a valid {vr} value" + (f" ({_FORMS[vr]})" if vr in _FORMS else "")
    return None


def invalid_reason(elem: DataElement) -> str | None:
    """Why a data element's value is not valid for its VR (or enumerated values), else ``None``.

    Sequences are invalid when any element of any item is.
    """
    if elem.VR == "SQ":
        for item in elem.value or []:
            for sub in item:
                reason = invalid_reason(sub)
                if reason:
                    return f"an item holds an invalid {sub.keyword or _tag_text(sub.tag)} ({reason})"
        return None
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    for v in values:
        if elem.VR == "PN":
            v = str(v)
        reason = _value_reason(elem.VR, v)
        if reason:
            return reason
    allowed = _ENUMERATED.get(elem.keyword)
    if allowed and any(str(v) not in allowed for v in values if v not in (None, "")):
        return "not one of the enumerated values " + "/".join(sorted(allowed))
    return None


def _empty(tag: int, vr: str) -> DataElement:
    return DataElement(tag, vr, DicomSequence([]) if vr == "SQ" else None)


def _shallow_copy(ds: Dataset) -> Dataset:
    """A data set sharing ``ds``'s elements (so edits never reach the caller's)."""
    out = Dataset({elem.tag: elem for elem in ds})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        out.set_original_encoding(implicit, little, ds.original_character_set)
    return out


def fix_headers(
    datasets: Sequence[Dataset], *, flagged: Iterable[str] = (), repair: bool = True
) -> tuple[list[Dataset], list[HeaderFix]]:
    """Repair the copied attributes of every data set of a series.

    Parameters
    ----------
    datasets:
        The source instances (not modified).
    flagged:
        Keywords that an external check (dciodvfy on a source instance) found
        invalid although :func:`invalid_reason` accepts them.
    repair:
        False: only add missing Type 2 attributes and repair the values
        highdicom refuses (the outputs cannot be built otherwise); record the
        rest as ``"kept"``.

    Returns
    -------
    tuple
        The data sets to build from (copies where something changed, the
        originals otherwise) and one :class:`HeaderFix` per attribute and
        action (the same fix on many instances is recorded once).
    """
    types = _module_types()
    flagged = {k for k in flagged if k in types}
    fixes: dict[tuple[str, str], HeaderFix] = {}
    out: list[Dataset] = []
    for ds in datasets:
        copy: Dataset | None = None
        for keyword, type_ in types.items():
            tag = tag_for_keyword(keyword)
            if tag is None or tag not in ds:
                continue
            elem = ds[tag]
            reason = invalid_reason(elem)
            if reason is None and keyword in flagged and not elem.is_empty:
                reason = "rejected by dciodvfy on the source instance"
            if reason is None:
                continue
            if (not repair and keyword not in _ALWAYS_REPAIR) or type_ in ("1", "1C"):
                action = "kept"
            else:
                action = "removed" if type_ == "3" else "emptied"
                copy = copy if copy is not None else _shallow_copy(ds)
                if action == "removed":
                    del copy[tag]
                else:
                    copy[tag] = _empty(tag, elem.VR)
            fixes.setdefault((keyword, action), HeaderFix(keyword, _tag_text(tag), type_, action, reason))
        for keyword in TYPE2_REQUIRED:
            if keyword not in ds:
                tag = tag_for_keyword(keyword)
                assert tag is not None
                copy = copy if copy is not None else _shallow_copy(ds)
                copy[tag] = _empty(tag, dictionary_VR(tag))
                fixes.setdefault((keyword, "added empty"), HeaderFix(
                    keyword, _tag_text(tag), types.get(keyword, "2"), "added empty", "Type 2 attribute missing"))
        out.append(copy if copy is not None else ds)
    return out, sorted(fixes.values(), key=lambda f: (f.tag, f.action))


def keyword_of(name_or_tag: str) -> str | None:
    """Keyword of an attribute named by dciodvfy: ``(0x0010,0x1010)`` or "Patient's Sex"."""
    m = re.match(r"\(0x([0-9a-fA-F]{4}),0x([0-9a-fA-F]{4})\)", name_or_tag)
    if m:
        return keyword_for_tag(int(m.group(1) + m.group(2), 16)) or None
    return _keywords_by_name().get(name_or_tag.strip())


@lru_cache(maxsize=1)
def _keywords_by_name() -> dict[str, str]:
    from pydicom.datadict import DicomDictionary

    return {str(entry[2]): str(entry[4]) for entry in DicomDictionary.values() if entry[4]}
