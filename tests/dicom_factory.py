"""Synthetic DICOM instances for tests (real files, real encodings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def make_instance(
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    modality: str = "CT",
    instance_number: int = 1,
    rows: int = 16,
    cols: int = 16,
    series_number: int = 1,
    series_description: str = "AXIAL",
    z: float | None = None,
    pixel_value: int = 100,
) -> Dataset:
    """A small, valid CT/MR image instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    sop_uid = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "TEST-001"
    ds.PatientName = "Test^Patient"
    ds.AccessionNumber = "ACC1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyDescription = "Head"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    zpos = float(instance_number if z is None else z)
    ds.ImagePositionPatient = [0.0, 0.0, zpos]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT":
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
    ds.PixelData = np.full((rows, cols), pixel_value, dtype=np.int16).tobytes()
    return ds


def make_study(
    n_series: int = 3, per_series: int = 4, *, modality: str = "CT", study_uid: str | None = None
) -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    out: list[Dataset] = []
    for s in range(n_series):
        series_uid = generate_uid()
        for i in range(per_series):
            out.append(
                make_instance(
                    study_uid=study_uid,
                    series_uid=series_uid,
                    modality=modality,
                    instance_number=i + 1,
                    series_number=s + 1,
                    series_description=f"SERIES {s + 1}",
                )
            )
    return out


def write_files(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def to_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def series_from_volume(
    volume: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (5.0, 2.0, 2.0),
    modality: str = "MR",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "AX FLAIR",
    series_number: int = 1,
    patient_name: str = "Test^Patient",
) -> list[Dataset]:
    """Single-frame slices of a (z, y, x) volume (values scaled to int16)."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    v = np.asarray(volume, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    scaled = np.round((v - lo) / (hi - lo + 1e-9) * 3000).astype(np.int16)
    out = []
    for z in range(v.shape[0]):
        ds = make_instance(
            study_uid=study_uid, series_uid=series_uid, modality=modality, instance_number=z + 1,
            rows=v.shape[1], cols=v.shape[2], series_number=series_number,
            series_description=series_description, z=z * spacing[0],
        )
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.PatientName = patient_name
        ds.PixelData = scaled[z].tobytes()
        out.append(ds)
    return out
