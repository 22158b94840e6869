"""Deterministic UIDs for the node's outputs.

A UID is derived from the node's UID root, the job id, the output kind, the
model version and the source study and series UIDs (so two nodes, or two
databases, that both have a "job 1" still make different UIDs for different
studies). Rebuilding the outputs of the same job with the same model gives
the same UIDs: a retry replaces the archived objects instead of adding new
ones. A different job id or model version gives different UIDs.

With the default root ``"2.25."`` the UID is ``2.25.<integer of a name-based
(version 5) UUID>`` (PS3.5 §B.2); with an organisation root it is
``<root><digits of a SHA-512 hash>`` as made by
:func:`pydicom.uid.generate_uid`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.uid import generate_uid

__all__ = ["UIDFactory", "derive_uid"]

#: Namespace of the name-based UUIDs (fixed forever: changing it changes every UID).
_NAMESPACE = uuid.UUID("6c1e3d52-5d0b-4f4e-9a38-0e7b9f1d2c41")


def derive_uid(root: str, *parts: object) -> str:
    """A UID that depends only on ``root`` and ``parts``.

    Parameters
    ----------
    root:
        ``"2.25."`` or an organisation root ending with ``"."``.
    parts:
        Anything with a stable ``str()``; joined unambiguously.
    """
    name = "\x1f".join(str(p).replace("\x1f", " ") for p in parts)
    if root == "2.25.":
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    return str(generate_uid(prefix=root, entropy_srcs=[name]))


@dataclass(frozen=True)
class UIDFactory:
    """UIDs of one job's outputs.

    Attributes
    ----------
    root:
        UID root (``OutputSettings.uid_root``).
    job_id:
        Node job id.
    model_version:
        ``AlgorithmInfo.version``.
    study_uid, source_series_uid:
        Source Study and Series Instance UIDs.
    """

    root: str
    job_id: int
    model_version: str
    study_uid: str
    source_series_uid: str

    def _uid(self, *parts: object) -> str:
        return derive_uid(
            self.root, "pacs-node", self.job_id, self.model_version, self.study_uid, self.source_series_uid, *parts
        )

    def series(self, kind: str) -> str:
        """Series Instance UID of output ``kind`` (e.g. ``"seg"``, ``"map:fractional"``)."""
        return self._uid("series", kind)

    def instance(self, kind: str, index: int = 0) -> str:
        """SOP Instance UID of the ``index``-th instance of output ``kind``."""
        return self._uid("instance", kind, index)

    def tracking(self, label: int | str) -> str:
        """Tracking UID of finding ``label`` (SEG segment / SR measurement group)."""
        return self._uid("tracking", label)

    def device(self) -> str:
        """UID of the observer device (node + model), stable across jobs."""
        return derive_uid(self.root, "pacs-node-device", self.model_version)
