"""Helpers for the output tests (``from outgen import ...``): synthetic CT/MR
series (single-frame, in shuffled order, non-ASCII names), an enhanced
multi-frame MR, pydicom's bundled CT/MR files, findings from a mask, and
PixelMed's SR validator."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage

from dicom_factory import make_instance
from worker.outputs.source import SourceSeries
from worker.outputs.types import AlgorithmInfo

#: Debian's libpixelmed-java.
PIXELMED_JAR = "/usr/share/java/pixelmed.jar"

ALGORITHM = AlgorithmInfo(name="pacs-node-anomaly", version="pacs-node-engine/0.1.0+0123456789ab",
                          checksum="0123456789ab" + "0" * 52, threshold=0.4321)


@dataclass
class Finding:
    label: int
    volume_mm3: float
    centroid_patient: tuple[float, float, float]
    bbox_zyx: tuple[int, int, int, int, int, int]
    max_score: float
    mean_score: float
    voxel_count: int


@dataclass
class Prediction:
    mask: np.ndarray
    anomaly_map: np.ndarray
    findings: list[Finding] = field(default_factory=list)
    study_score: float = 0.0
    threshold: float = 0.4321
    domain: dict[str, Any] = field(default_factory=dict)


#: A training-domain check that failed (``Prediction.domain`` of the engine).
OUT_OF_DOMAIN: dict[str, Any] = {
    "in_domain": False,
    "warnings": ["slice thickness 8.0 mm is outside the training range 1.0-6.0 mm",
                 "pixel spacing 0.2 mm is outside the training range 0.5-1.5 mm"],
    "checks": {"slice_thickness_mm": {"value": 8.0, "range": [1.0, 6.0], "ok": False},
               "pixel_spacing_mm": {"value": 0.2, "range": [0.5, 1.5], "ok": False},
               "modality": {"value": "CT", "allowed": ["CT", "MR"], "ok": True}},
}


def findings_from(mask: np.ndarray, amap: np.ndarray, source: SourceSeries, voxel_mm3: float = 1.0) -> list[Finding]:
    """Connected components of ``mask`` as findings (centroid in patient space)."""
    labels, n = ndimage.label(mask)
    out = []
    for lab in range(1, n + 1):
        region = labels == lab
        zs, ys, xs = np.nonzero(region)
        zc, yc, xc = zs.mean(), ys.mean(), xs.mean()
        # patient position: slice position + in-plane offset (axial, unit spacing in the synthetic series)
        pos = np.asarray(source.slices[int(round(zc))].position)
        out.append(Finding(
            label=lab,
            volume_mm3=float(region.sum() * voxel_mm3),
            centroid_patient=(float(pos[0] + xc), float(pos[1] + yc), float(pos[2])),
            bbox_zyx=(int(zs.min()), int(ys.min()), int(xs.min()), int(zs.max()), int(ys.max()), int(xs.max())),
            max_score=float(amap[region].max()),
            mean_score=float(amap[region].mean()),
            voxel_count=int(region.sum()),
        ))
    return out


def prediction_for(source: SourceSeries, boxes: list[tuple[slice, slice, slice]], seed: int = 0) -> Prediction:
    """A prediction with anomalies in ``boxes`` (map ≥ 0.5 inside, < 0.5 outside)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(source.shape, bool)
    for b in boxes:
        mask[b] = True
    amap = (rng.random(source.shape) * 0.45).astype(np.float32)
    amap[mask] = 0.5 + rng.random(int(mask.sum())).astype(np.float32) * 0.5
    f = findings_from(mask, amap, source)
    return Prediction(mask=mask, anomaly_map=amap, findings=f, study_score=1.0 + 0.1 * len(f) if f else 0.3)


def synthetic_series(
    *,
    modality: str = "CT",
    n: int = 8,
    rows: int = 24,
    cols: int = 20,
    charset: str = "ISO_IR 100",
    patient_name: str = "Test^Patient",
    shuffle: bool = True,
    seed: int = 1,
) -> list[Dataset]:
    """Single-frame series with gradient pixels; instance numbers deliberately not in z order."""
    study, series = generate_uid(), generate_uid()
    rng = random.Random(seed)
    numbers = list(range(1, n + 1))
    rng.shuffle(numbers)  # InstanceNumber unrelated to position
    out = []
    for i in range(n):
        ds = make_instance(study_uid=study, series_uid=series, modality=modality, instance_number=numbers[i],
                           rows=rows, cols=cols, z=-20.0 + 2.5 * i)
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient_name
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyID = "S1"
        ds.ReferringPhysicianName = "Ref^Doctor"
        ds.SliceThickness = 2.5
        ds.WindowCenter = 200
        ds.WindowWidth = 400
        ds.PixelData = (np.add.outer(np.arange(rows), np.arange(cols)) * 10 + i).astype(np.int16).tobytes()
        out.append(ds)
    if shuffle:
        rng.shuffle(out)
    return out


def multiframe_mr(n: int = 6) -> Dataset:
    """A Legacy Converted Enhanced MR Image (multi-frame, functional groups) built with highdicom."""
    frames = synthetic_series(modality="MR", n=n, shuffle=False)
    for ds in frames:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 10
        ds.RepetitionTime = 500
        ds.EchoTrainLength = 1
        ds.Manufacturer = "pacs-node-tests"
        ds.FrameOfReferenceUID = frames[0].FrameOfReferenceUID
        ds.PositionReferenceIndicator = ""
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = ds.StudyTime
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.AcquisitionDate = ds.StudyDate
        ds.AcquisitionTime = ds.StudyTime
        ds.PixelRepresentation = 0
        ds.PixelData = np.frombuffer(ds.PixelData, np.int16).astype(np.uint16).tobytes()
    rng = random.Random(3)
    rng.shuffle(frames)  # stored frame order differs from z order
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=frames,
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    return mf


def bundled(name: str) -> list[Dataset]:
    return [pydicom.dcmread(get_testdata_file(name))]


SourceFactory = Callable[[], list[Dataset]]

SOURCES: dict[str, SourceFactory] = {
    "ct-single": lambda: synthetic_series(modality="CT"),
    "mr-single": lambda: synthetic_series(modality="MR", charset="ISO_IR 192", patient_name="Müller^Jürgen"),
    "mr-multiframe": lambda: [multiframe_mr()],
    "ct-small": lambda: bundled("CT_small.dcm"),
    "mr-small": lambda: bundled("MR_small.dcm"),
}


def write_series(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = directory / f"{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def decode_by_reference(seg: Dataset, source: SourceSeries) -> np.ndarray:
    """Rebuild a ``(z, y, x)`` mask from a SEG using only each frame's source
    reference (DerivationImageSequence) — and check each frame's plane position
    equals its source slice's position."""
    by_ref = {(s.sop_instance_uid, s.frame_number): z for z, s in enumerate(source.slices)}
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    out = np.zeros(source.shape, np.float32)
    for k, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        srcs = [s for d in frame.DerivationImageSequence for s in d.SourceImageSequence]
        assert len(srcs) == 1, "each SEG frame must reference exactly one source image/frame"
        fn = srcs[0].get("ReferencedFrameNumber")
        z = by_ref[(str(srcs[0].ReferencedSOPInstanceUID), int(fn) if fn is not None else None)]
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, source.slices[z].position, atol=1e-3)
        out[z] = pixels[k]
    return out


def run_pixelmed_sr(path: Path, jar: str = PIXELMED_JAR) -> tuple[list[str], list[str]]:
    """PixelMed's ``DicomSRValidator`` (IOD + templates) on one SR file.

    Returns
    -------
    tuple[list[str], list[str]]
        Its ``Error`` and ``Warning`` lines. The JDK's XPath limits are lifted:
        PixelMed's compiled template rules exceed them.
    """
    limits = [f"-Djdk.xml.{k}=0" for k in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]
    res = subprocess.run(["java", *limits, "-cp", jar, "com.pixelmed.validate.DicomSRValidator", str(path)],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "Found Root Template TID_1500" in out and "IOD validation complete" in out, out[-3000:]
    lines = out.splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


#: Real-world header defects (value, attribute, what the gate does with it in the outputs).
HEADER_DEFECTS: dict[str, tuple[Any, str]] = {
    "PatientAge": ("42", "removed"),  # AS without unit (Type 3)
    "StudyDate": ("2026-01-01", "emptied"),  # DA with separators (Type 2)
    "PatientName": ("Doe_John", "kept"),  # PN with "_": dciodvfy warns only ("Retired Person Name form")
    "StudyDescription": ("MRI brain with and without contrast, epilepsy protocol 7, follow-up examination", "removed"),  # LO > 64
    "AccessionNumber": ("ACC-2026-000123456", "emptied"),  # SH > 16 (Type 2)
    "PatientSex": ("male", "emptied"),  # CS lowercase, not an enumerated value (Type 2)
    "AdditionalPatientHistory": ("x" * 10, "kept"),  # LT: valid, untouched
    "BodyPartExamined": ("head and neck region", "source only"),  # bad CS, General Series: not copied
    # Type 1: cannot be repaired; inherited by every output
    "ClinicalTrialSponsorName": ("Sponsor " + "S" * 60, "kept"),
}
#: Type 2 attributes the corpus leaves out (added empty in the outputs).
HEADER_MISSING = ("PatientBirthDate", "ReferringPhysicianName")


def with_header_defects(datasets: list[Dataset]) -> list[Dataset]:
    """``datasets`` with :data:`HEADER_DEFECTS` and :data:`HEADER_MISSING` (in place, returned)."""
    for ds in datasets:
        for keyword, (value, _) in HEADER_DEFECTS.items():
            setattr(ds, keyword, value)
        # the rest of a plausible Clinical Trial Subject module
        ds.ClinicalTrialProtocolID = "P-7"
        ds.ClinicalTrialProtocolName = "Follow-up"
        ds.ClinicalTrialSiteID = "S1"
        ds.ClinicalTrialSiteName = "Site 1"
        ds.ClinicalTrialSubjectID = "SUBJ-1"
        for keyword in HEADER_MISSING:
            if keyword in ds:
                delattr(ds, keyword)
    return datasets


def run_pixelmed_instance(path: Path, jar: str = PIXELMED_JAR) -> tuple[list[str], list[str]]:
    """PixelMed's ``DicomInstanceValidator`` (IOD rules) on one file: its Error and Warning lines."""
    limits = [f"-Djdk.xml.{k}=0" for k in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]
    res = subprocess.run(["java", *limits, "-cp", jar, "com.pixelmed.validate.DicomInstanceValidator", str(path)],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "IOD validation complete" in out, out[-3000:]
    lines = out.splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]
