"""UID grammar (PS3.5 §9.1) checks, applied before a UID touches a path."""

from __future__ import annotations

import re

__all__ = ["InvalidUIDError", "check_uid", "is_valid_uid"]

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
        Naming ``what`` (e.g. "SOPInstanceUID"), without echoing long input.
    """
    if value is None or value == "":
        raise InvalidUIDError(f"missing {what}")
    if not is_valid_uid(value):
        shown = repr(str(value)[:70])
        raise InvalidUIDError(f"{what} {shown} is not a valid UID")
    return str(value)
