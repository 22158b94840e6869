"""UID grammar (PS3.5 §9.1) checks, applied before a UID touches a path."""

from __future__ import annotations

import hashlib
import re

__all__ = ["InvalidUIDError", "check_uid", "describe_invalid_uid", "is_valid_uid"]

# Components are digits without leading zeros (a lone "0" is allowed),
# separated by single dots; at most 64 characters.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidUIDError(ValueError):
    """A UID does not follow the DICOM UID grammar."""


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a string that follows the UID grammar."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


def check_uid(value: object, what: str) -> str:
    """Return ``value`` if it is a valid UID.

    Raises
    ------
    InvalidUIDError
        Naming ``what`` (e.g. "SOPInstanceUID") and what is wrong, never
        the value itself (:func:`describe_invalid_uid`).
    """
    if value is None or value == "":
        raise InvalidUIDError(f"missing {what}")
    if not is_valid_uid(value):
        # Never echo the value (logs, DIMSE Error Comments, HTTP details): it
        # may be anything a peer sent, patient data included.
        raise InvalidUIDError(f"{what} is not a valid UID ({describe_invalid_uid(value)})")
    return str(value)


def describe_invalid_uid(value: object) -> str:
    """What is wrong with a UID, without its content: its length, the first
    rule it breaks and a short SHA-256 (to match log lines of the same value).

    Parameters
    ----------
    value:
        The value that failed :func:`is_valid_uid`.

    Returns
    -------
    str
        E.g. ``"70 characters, longer than 64, sha256 3f2a9c01d4e7"``.
    """
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    if len(value) > 64:
        why = "longer than 64"
    elif re.search(r"[^0-9.]", value):
        why = "characters other than digits and dots"
    else:
        why = "an empty component or a leading zero"
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{len(value)} characters, {why}, sha256 {digest}"
