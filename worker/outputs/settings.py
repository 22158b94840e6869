"""The ``[outputs]`` TOML table, validated (``OutputSettings.model_validate(settings.outputs)``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

__all__ = ["OutputSettings"]

_UID_PREFIX_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def _lo(value: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash or control characters."""
    if len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("must be at most 64 characters without backslash or control characters")
    return value


class OutputSettings(BaseModel):
    """What the worker produces for a job and how it is labelled.

    Every SOP/Series Instance UID is derived from ``uid_root`` + job id +
    output kind + model version + source study/series UIDs, so a retry of the
    same job produces the same UIDs (the archive replaces the objects instead
    of duplicating them).
    """

    model_config = {"extra": "forbid"}

    #: UID root ending with ".". The default "2.25." makes name-based UUID
    #: (version 5) UIDs; an organisation root (at most 54 characters) makes
    #: ``<root><sha512 digits>`` UIDs (pydicom's generate_uid).
    uid_root: str = "2.25."
    manufacturer: str = "pacs-node"
    #: Equipment module Device Serial Number of the node.
    device_serial_number: str = "1"
    institution_name: str = ""

    #: The binary DICOM SEG of the anomaly mask is always made when something
    #: is found (the SR references it). When nothing is found: "omit" = no SEG (the SR states the absence),
    #: "empty" = a SEG with one empty segment.
    seg_when_empty: Literal["omit", "empty"] = "omit"
    #: "per_finding": one segment per finding ("Anomaly 1..n", referenced by
    #: the SR group of the same finding); "merged": one segment "Anomaly".
    seg_segments: Literal["per_finding", "merged"] = "per_finding"
    #: Leave out frames without any segmented pixel. The default (false) keeps
    #: one frame per source slice, the layout every viewer places correctly.
    seg_omit_empty_frames: bool = False
    seg_series_number: int = Field(default=9901, ge=1, le=2**31 - 1)
    seg_series_description: str = "AI anomaly SEG (NOT FOR CLINICAL USE)"

    #: Continuous anomaly map: "parametric" (Parametric Map: OHIF and
    #: 3D Slicer load it), "fractional" (FRACTIONAL SEG: 3D Slicer only;
    #: OHIF's adapters refuse it), or "none".
    anomaly_map: Literal["fractional", "parametric", "none"] = "parametric"
    #: Produce the map also when nothing was found.
    anomaly_map_when_empty: bool = True
    map_series_number: int = Field(default=9902, ge=1, le=2**31 - 1)
    map_series_description: str = "AI anomaly map (NOT FOR CLINICAL USE)"

    sr_series_number: int = Field(default=9903, ge=1, le=2**31 - 1)
    #: Tag each finding's SR Tracking Identifier the way Cornerstone3D does
    #: ("Cornerstone3DTools@^0.1.0:PlanarFreehandROI:Anomaly n"), so OHIF
    #: loads the findings as measurements; false: plain "Anomaly n" (OHIF
    #: then shows the report read-only).
    sr_ohif_tracking: bool = True
    sr_series_description: str = "AI anomaly report (NOT FOR CLINICAL USE)"

    #: Secondary-capture RGB images of the slices with findings, outlined.
    overlay: bool = False
    overlay_series_number: int = Field(default=9904, ge=1, le=2**31 - 1)
    overlay_series_description: str = "AI anomaly overlay (NOT FOR CLINICAL USE)"
    #: At most this many overlay images (the slices with the largest anomaly area).
    overlay_max_images: int = Field(default=64, ge=1)
    #: Outline colour (R, G, B).
    overlay_color: tuple[int, int, int] = (255, 0, 0)

    #: Check every output with dciodvfy (dicom3tools) when it is installed.
    #: Only errors the node introduces fail a job: one source instance is
    #: checked too, and an output error the source has as well is recorded
    #: as inherited (``outputs.validation``, the job's findings).
    dciodvfy: bool = True
    #: Invalid values the outputs copy from the source (patient and study
    #: attributes): "fix" = drop an invalid Type 3 attribute, empty an
    #: invalid Type 2 one (each change is recorded); "keep" = copy as is,
    #: except values highdicom refuses to build from (Patient's Sex, Patient's
    #: Birth Date, Study Date and Time), which are emptied either way.
    source_header_fixes: Literal["fix", "keep"] = "fix"
    #: Path of dciodvfy; "" = look in /usr/bin and on PATH.
    dciodvfy_path: str = ""
    #: Fail (instead of warn) when dciodvfy is not installed.
    require_dciodvfy: bool = False
    #: Seconds dciodvfy may take per file.
    dciodvfy_timeout: float = Field(default=60.0, gt=0)

    @field_validator("uid_root")
    @classmethod
    def _check_root(cls, v: str) -> str:
        if not _UID_PREFIX_RE.match(v) or len(v) > 54:
            raise ValueError('must be a UID prefix ending with "." of at most 54 characters, e.g. "2.25."')
        return v

    @field_validator(
        "manufacturer",
        "institution_name",
        "seg_series_description",
        "map_series_description",
        "sr_series_description",
        "overlay_series_description",
    )
    @classmethod
    def _check_lo(cls, v: str) -> str:
        return _lo(v)

    @field_validator("device_serial_number")
    @classmethod
    def _check_serial(cls, v: str) -> str:
        if not v or len(_lo(v)) > 64:
            raise ValueError("must be 1-64 characters")
        return v

    @field_validator("overlay_color")
    @classmethod
    def _check_color(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError("each component must be 0..255")
        return v
