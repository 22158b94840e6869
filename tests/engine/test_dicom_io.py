"""Loading DICOM series: ordering, geometry, rescale, multi-frame, refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from worker.engine.dicom_io import SeriesError, load_directory, load_series, load_series_refs

ROT = np.deg2rad(20.0)
ROW = np.array([np.cos(ROT), np.sin(ROT), 0.0])
COL = np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ROW, COL)


def _base(modality: str, series: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.SeriesInstanceUID = series
    ds.StudyInstanceUID = "1.2.3"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _single(path: Path, pixels: np.ndarray, pos: np.ndarray, inst: int, series: str, row=ROW, col=COL,
            slope: float = 2.0, intercept: float = -1024.0) -> str:
    ds = _base("CT", series, "1.2.840.10008.5.1.4.1.1.2")
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagePositionPatient = [float(v) for v in pos]
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.PixelSpacing = [0.8, 0.6]
    ds.SliceThickness = 3.0
    ds.InstanceNumber = inst
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _series(tmp: Path, n: int = 5, series: str = "1.2.3.4", shape=(6, 7)) -> tuple[list[Path], list[str], list[np.ndarray]]:
    origin = np.array([10.0, -20.0, 30.0])
    rng = np.random.default_rng(0)
    files, uids, pix = [], [], []
    order = [3, 0, 4, 1, 2][:n] if n == 5 else list(range(n))[::-1]
    for k in order:  # files written (and instance-numbered) out of spatial order
        p = rng.integers(0, 1000, shape)
        f = tmp / f"{series}-{k}.dcm"
        uid = _single(f, p, origin + 2.5 * k * NORMAL, inst=100 - k, series=series)
        files.append(f)
        uids.append((k, uid))
        pix.append((k, p))
    uids_sorted = [u for _, u in sorted(uids)]
    pix_sorted = [p for _, p in sorted(pix, key=lambda t: t[0])]
    return files, uids_sorted, pix_sorted


def test_single_frame_sorted_by_position(tmp_path: Path) -> None:
    files, uids, pix = _series(tmp_path)
    vol, got = load_series(files)
    assert got == uids
    assert vol.shape == (5, 6, 7) and vol.modality == "CT"
    np.testing.assert_allclose(vol.array, np.stack(pix) * 2.0 - 1024.0)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.6))
    np.testing.assert_allclose(vol.origin, (10.0, -20.0, 30.0))
    np.testing.assert_allclose(vol.direction, np.stack([ROW, COL, NORMAL], 1), atol=1e-9)
    # voxel (z=2, y=1, x=3) sits at origin + 2*2.5*normal + 1*0.8*col + 3*0.6*row
    np.testing.assert_allclose(vol.index_to_patient((2, 1, 3)),
                               np.array([10.0, -20.0, 30.0]) + 5.0 * NORMAL + 0.8 * COL + 1.8 * ROW)


def test_ties_broken_by_instance_number(tmp_path: Path) -> None:
    a = _single(tmp_path / "a.dcm", np.zeros((4, 4)), np.zeros(3), inst=2, series="9")
    b = _single(tmp_path / "b.dcm", np.ones((4, 4)), np.zeros(3), inst=1, series="9")
    c = _single(tmp_path / "c.dcm", np.ones((4, 4)), NORMAL * 3.0, inst=0, series="9")
    _, uids = load_series([tmp_path / "a.dcm", tmp_path / "c.dcm", tmp_path / "b.dcm"])
    assert uids == [b, a, c]


def test_refuses_mixed_series(tmp_path: Path) -> None:
    _single(tmp_path / "a.dcm", np.zeros((4, 4)), np.zeros(3), 1, "7")
    _single(tmp_path / "b.dcm", np.zeros((4, 4)), NORMAL, 2, "7", row=np.array([1.0, 0, 0]), col=np.array([0, 1.0, 0]))
    _single(tmp_path / "c.dcm", np.zeros((5, 4)), NORMAL, 2, "7")
    _single(tmp_path / "d.dcm", np.zeros((4, 4)), NORMAL, 2, "8")
    with pytest.raises(SeriesError, match="orientation"):
        load_series([tmp_path / "a.dcm", tmp_path / "b.dcm"])
    with pytest.raises(SeriesError, match="size"):
        load_series([tmp_path / "a.dcm", tmp_path / "c.dcm"])
    with pytest.raises(SeriesError, match="different series"):
        load_series([tmp_path / "a.dcm", tmp_path / "d.dcm"])
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    with pytest.raises(SeriesError):
        load_series([tmp_path / "junk.dcm"])


def test_enhanced_multiframe(tmp_path: Path) -> None:
    ds = _base("MR", "5.6.7", "1.2.840.10008.5.1.4.1.1.4.1")
    frames = np.stack([np.full((3, 4), 10 * k) for k in range(4)]).astype(np.uint16)
    order = [2, 0, 3, 1]  # stored out of order
    ds.NumberOfFrames = 4
    ds.Rows, ds.Columns = 3, 4
    shared = Dataset()
    po, pm, pt = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    pm.PixelSpacing = [1.5, 1.25]
    pm.SliceThickness = 4.0
    pt.RescaleSlope, pt.RescaleIntercept = 0.5, 3.0
    shared.PlaneOrientationSequence = [po]
    shared.PixelMeasuresSequence = [pm]
    shared.PixelValueTransformationSequence = [pt]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for k in order:
        fr, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, -5.0 + 4.0 * k]
        fr.PlanePositionSequence = [pp]
        per.append(fr)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = frames[order].tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    vol, refs = load_series_refs([tmp_path / "mf.dcm"])
    np.testing.assert_allclose(vol.array[:, 0, 0], [10 * k * 0.5 + 3.0 for k in range(4)])
    assert [r.frame_number for r in refs] == [order.index(k) + 1 for k in range(4)]
    assert vol.spacing == pytest.approx((4.0, 1.5, 1.25)) and vol.origin == pytest.approx((0.0, 0.0, -5.0))
    _, uids = load_series([tmp_path / "mf.dcm"])
    assert uids == [str(ds.SOPInstanceUID)] * 4


def test_load_directory_groups_series(tmp_path: Path) -> None:
    _series(tmp_path, 5, "1.1")
    _series(tmp_path, 3, "2.2", shape=(5, 5))
    (tmp_path / "README.txt").write_text("not dicom")
    vols = load_directory(tmp_path)
    assert sorted(v.shape for v in vols) == [(3, 5, 5), (5, 6, 7)]
    assert {v.meta["series_uid"] for v in vols} == {"1.1", "2.2"}
    with pytest.raises(SeriesError):
        load_directory(tmp_path / "missing")
