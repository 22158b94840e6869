"""The validation gate: every output is re-read and checked by ``dciodvfy``.

An output passes when

1. the file, read once with pydicom, loads as what it claims to be
   (highdicom ``seg.Segmentation.from_dataset`` for SEG and FRACTIONAL SEG,
   ``pm.ParametricMap.from_dataset`` for Parametric Maps,
   ``sr.Comprehensive3DSR.from_dataset`` for the SR, pydicom for SC
   overlays), with the SOP Class and
   Instance UIDs it was built with and the expected content (the decoded mask
   has as many set pixels as the engine's mask, the SR has one ROI group per
   finding, ...);
2. ``dciodvfy`` (dicom3tools), when installed, reports no ``Error`` line
   that the node introduced. An error the checked source instance has too
   (:mod:`worker.outputs.gate`) is inherited: kept in
   :attr:`ValidationReport.inherited`, not a failure. Warnings are kept in
   :attr:`ValidationReport.warnings`; all are stored in
   ``outputs.validation`` without the values dciodvfy quotes.

Anything else raises :class:`OutputValidationError`, naming the output and the
reasons; such an output is never delivered.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .gate import SourceCheck, classify, redact
from .types import BuiltOutput

__all__ = [
    "OutputValidationError",
    "ValidationReport",
    "find_dciodvfy",
    "run_dciodvfy",
    "validate_file",
    "volumetric_roi_groups",
]

log = logging.getLogger(__name__)


class OutputValidationError(RuntimeError):
    """An output failed the validation gate.

    Attributes
    ----------
    kind, filename:
        The output.
    reasons:
        One line per problem (dciodvfy ``Error`` lines, re-read failures).
    """

    def __init__(self, kind: str, filename: str, reasons: list[str]) -> None:
        self.kind = kind
        self.filename = filename
        self.reasons = [redact(r) for r in reasons]
        shown = "; ".join(self.reasons[:5]) + (f" (+{len(self.reasons) - 5} more)" if len(self.reasons) > 5 else "")
        super().__init__(f"{kind} output {filename} failed validation: {shown}")


@dataclass
class ValidationReport:
    """Result of the gate for one file (stored as JSON in ``outputs.validation``)."""

    kind: str
    filename: str
    reread: str = "ok"
    dciodvfy: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: dciodvfy errors the source instance has too (not the node's doing).
    inherited: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "reread": self.reread,
            "dciodvfy": self.dciodvfy or "not available",
            "errors": [redact(e) for e in self.errors],
            "inherited": [redact(e) for e in self.inherited],
            "warnings": [redact(w) for w in self.warnings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def find_dciodvfy(configured: str = "") -> str | None:
    """Path of dciodvfy: ``configured`` if given, else /usr/bin, else PATH."""
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    if os.access("/usr/bin/dciodvfy", os.X_OK):
        return "/usr/bin/dciodvfy"
    return shutil.which("dciodvfy")


def run_dciodvfy(path: str | Path, executable: str, timeout: float = 60.0) -> tuple[list[str], list[str]]:
    """Run dciodvfy on one file; returns ``(errors, warnings)`` (message lines).

    ``Abort`` lines and a time-out count as errors.
    """
    try:
        proc = subprocess.run(
            [executable, str(path)], capture_output=True, text=True, errors="replace", timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return [f"dciodvfy did not finish in {timeout:g} s"], []
    errors: list[str] = []
    warnings: list[str] = []
    for line in (proc.stderr + "\n" + proc.stdout).splitlines():
        line = line.strip()
        if line.startswith("Error") or line.startswith("Abort"):
            errors.append(line)
        elif line.startswith("Warning"):
            warnings.append(line)
    return errors, warnings


def volumetric_roi_groups(report: Dataset) -> int:
    """Number of TID 1411 measurement groups under the report's Imaging Measurements.

    The same count as highdicom's
    ``MeasurementReport.get_volumetric_roi_measurement_groups()`` without
    building a highdicom object per content item (which costs ~0.5 s for a
    400-slice study's report); ``tests/outputs/test_build.py`` checks that the
    two agree.
    """
    count = 0
    for item in report.get("ContentSequence", []):
        if _concept(item) != ("126010", "DCM"):  # Imaging Measurements
            continue
        for group in item.get("ContentSequence", []):
            if group.get("ValueType") != "CONTAINER" or _concept(group) != ("125007", "DCM"):
                continue
            templates = group.get("ContentTemplateSequence", [])
            if templates and str(templates[0].get("TemplateIdentifier", "")) == "1411":
                count += 1
    return count


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence", [])
    if not names:
        return None
    return str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", ""))


def _reread(path: Path, built: BuiltOutput) -> list[str]:
    """Re-read the written file; return problems found."""
    problems: list[str] = []
    ds = pydicom.dcmread(str(path))
    if str(ds.SOPInstanceUID) != built.sop_instance_uid:
        problems.append("SOP Instance UID differs from the built object")
    if str(ds.SOPClassUID) != built.sop_class_uid:
        problems.append("SOP Class UID differs from the built object")
    exp = built.expected
    if built.kind == "seg" or (built.kind == "map" and ds.Modality == "SEG"):
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)  # the data set read above, not the file again
        numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
        sums = list(exp.get("segment_sums") or [None])
        if numbers != list(range(1, len(sums) + 1)):
            problems.append(f"SEG has segments {numbers}, expected 1..{len(sums)}")
        pixels = seg.pixel_array
        if pixels.ndim == 2:
            pixels = pixels[None]
        if "frames" in exp and pixels.shape[0] != exp["frames"]:
            problems.append(f"SEG has {pixels.shape[0]} frames, expected {exp['frames']}")
        if "mask_sum" in exp and int(np.count_nonzero(pixels)) != exp["mask_sum"]:
            problems.append(f"SEG decodes to {int(np.count_nonzero(pixels))} set pixels, expected {exp['mask_sum']}")
        if len(sums) > 1 or (sums and sums[0] is not None and "mask_sum" not in exp):
            # each frame holds one segment (Segment Identification of its functional group)
            got = [0] * len(sums)
            for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
                number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                if 1 <= number <= len(got):
                    got[number - 1] += int(np.count_nonzero(pixels[k]))
            if got != sums:
                problems.append(f"SEG segments decode to {got} set pixels, expected {sums}")
    elif built.kind == "map":
        pm = hd.pm.ParametricMap.from_dataset(ds)
        pixels = pm.pixel_array
        if "frames" in exp and (pixels.shape[0] if pixels.ndim == 3 else 1) != exp["frames"]:
            problems.append("Parametric Map frame count differs from the source")
    elif built.kind == "sr":
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False)
        groups = volumetric_roi_groups(sr)
        if "findings" in exp and groups != exp["findings"]:
            problems.append(f"SR has {groups} ROI groups, expected {exp['findings']}")
        if str(sr.VerificationFlag) != "UNVERIFIED":
            problems.append("SR must be UNVERIFIED")
    elif built.kind == "overlay":
        if ds.pixel_array.ndim != 3 or ds.pixel_array.shape[-1] != 3:
            problems.append("overlay is not an RGB image")
    return problems


def validate_file(
    path: str | Path,
    built: BuiltOutput,
    *,
    use_dciodvfy: bool = True,
    dciodvfy_path: str = "",
    require_dciodvfy: bool = False,
    timeout: float = 60.0,
    source_check: SourceCheck | None = None,
) -> ValidationReport:
    """Validate one written output.

    Parameters
    ----------
    path, built:
        The written file and what it was built as.
    use_dciodvfy, dciodvfy_path, require_dciodvfy, timeout:
        Whether and how dciodvfy runs.
    source_check:
        dciodvfy's verdict on a source instance: output errors it has too
        are inherited, not failures. ``None``: every error fails.

    Returns
    -------
    ValidationReport
        With dciodvfy's warnings and the inherited errors.

    Raises
    ------
    OutputValidationError
        On any error (re-read failure, dciodvfy ``Error`` line, dciodvfy
        missing while ``require_dciodvfy``).
    """
    path = Path(path)
    report = ValidationReport(kind=built.kind, filename=path.name)
    try:
        problems = _reread(path, built)
    except Exception as exc:  # noqa: BLE001 - any failure to re-read is a validation error
        problems = [f"re-read failed: {type(exc).__name__}: {exc}"]
    if problems:
        report.reread = "failed"
        report.errors.extend(problems)
    if use_dciodvfy:
        exe = find_dciodvfy(dciodvfy_path)
        if exe is None:
            if require_dciodvfy:
                report.errors.append("dciodvfy (dicom3tools) is not installed")
            else:
                log.warning("dciodvfy not found; %s checked by re-reading only", path.name)
        else:
            report.dciodvfy = exe
            errors, warnings = run_dciodvfy(path, exe, timeout)
            introduced, inherited = classify(errors, source_check)
            report.errors.extend(f"dciodvfy: {e}" for e in introduced)
            report.inherited.extend(inherited)
            report.warnings.extend(warnings)
    if report.errors:
        raise OutputValidationError(built.kind, path.name, report.errors)
    return report
