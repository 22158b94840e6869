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


def test_duplicate_positions_are_a_clear_error_naming_the_series(tmp_path: Path) -> None:
    """Three images at one position (e.g. echoes stored in one series): not one
    volume. The error names the series and says why; the pipeline turns a
    SeriesError into a permanent job failure."""
    files = [tmp_path / f"{k}.dcm" for k in range(4)]
    for k, f in enumerate(files):
        _single(f, np.full((4, 4), k), NORMAL * (0.0 if k < 3 else 3.0), inst=k + 1, series="1.2.826.0.1.9")
    with pytest.raises(SeriesError, match=r"series 1\.2\.826\.0\.1\.9 has 4 images at 2 slice positions") as err:
        load_series(files)
    assert "echoes, phases" in str(err.value)
    # positions that differ by more than the tolerance are fine, in any file order
    _, uids = load_series([files[3], files[0]])
    assert len(uids) == 2


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


# ----------------------------------------------------------------- transfer syntaxes
#: How each accepted image transfer syntax is made from an uncompressed file:
#: dcmtk's own encoders (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmconv``), or
#: pydicom with pylibjpeg-openjpeg for JPEG 2000 (dcmtk has no free J2K encoder).
#: ``(bits stored, tool + arguments or "pydicom", largest allowed error in stored values)``.
SYNTAXES: dict[str, tuple[int, list[str], int]] = {
    "1.2.840.10008.1.2": (16, ["dcmconv", "+ti"], 0),
    "1.2.840.10008.1.2.1.99": (16, ["dcmconv", "+td"], 0),
    "1.2.840.10008.1.2.2": (16, ["dcmconv", "+tb"], 0),
    "1.2.840.10008.1.2.4.50": (8, ["dcmcjpeg", "+eb", "+q", "95", "+un"], 12),
    "1.2.840.10008.1.2.4.51": (12, ["dcmcjpeg", "+ee", "+q", "95", "+un"], 120),
    "1.2.840.10008.1.2.4.57": (16, ["dcmcjpeg", "+el", "+sv", "6"], 0),
    "1.2.840.10008.1.2.4.70": (16, ["dcmcjpeg", "+e1"], 0),
    "1.2.840.10008.1.2.4.80": (16, ["dcmcjpls", "+el"], 0),
    "1.2.840.10008.1.2.4.81": (16, ["dcmcjpls", "+en", "+md", "2", "+un"], 2),
    "1.2.840.10008.1.2.4.90": (16, ["pydicom"], 0),
    "1.2.840.10008.1.2.4.91": (16, ["pydicom"], 600),  # ratio 8 on a 16-bit range of ~59000
    "1.2.840.10008.1.2.5": (16, ["dcmcrle"], 0),
}


def _plain_series(tmp: Path, bits: int, n: int = 3, shape: tuple[int, int] = (40, 32)) -> tuple[list[Path], np.ndarray]:
    """An uncompressed single-frame series with smooth, non-trivial pixels (stored values, z order)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    top = (1 << bits) - 1
    stack = []
    files = []
    for k in range(n):
        pix = ((np.sin(yy / 3.0 + k) + np.cos(xx / 4.0)) * 0.2 + 0.5) * top * 0.9
        pix = np.clip(pix + (yy * xx) % 7, 0, top).astype(np.uint8 if bits == 8 else np.uint16)
        ds = _base("CT", "1.2.826.0.1.77", "1.2.840.10008.5.1.4.1.1.2")
        ds.BitsAllocated = 8 if bits == 8 else 16
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.Rows, ds.Columns = shape
        ds.ImagePositionPatient = [float(v) for v in NORMAL * 2.0 * k]
        ds.ImageOrientationPatient = [float(v) for v in (*ROW, *COL)]
        ds.PixelSpacing = [0.8, 0.6]
        ds.InstanceNumber = k + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -100.0
        ds.PixelData = pix.tobytes()
        f = tmp / f"plain-{k}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
        stack.append(pix.astype(np.float32) - 100.0)
    return files, np.stack(stack)


def _encode(src: Path, dst: Path, ts: str, how: list[str]) -> None:
    import subprocess

    from nodetest import require_tool

    if how == ["pydicom"]:
        ds = pydicom.dcmread(src)
        ratios = [8.0] if ts.endswith(".91") else None  # lossy: compression ratio 8
        ds.compress(ts, encoding_plugin="pylibjpeg", generate_instance_uid=False, j2k_cr=ratios)
        ds.save_as(dst, enforce_file_format=True)
        return
    tool = require_tool(how[0])
    subprocess.run([tool, *how[1:], str(src), str(dst)], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("ts", sorted(SYNTAXES))
def test_every_accepted_image_transfer_syntax_decodes(ts: str, tmp_path: Path) -> None:
    """Each file really is in ``ts`` (read back from its meta header) and the
    worker's loader gives the same volume as from the uncompressed files
    (exactly, or within the codec's bound for the lossy syntaxes)."""
    bits, how, tolerance = SYNTAXES[ts]
    plain, expected = _plain_series(tmp_path, bits)
    encoded = []
    for f in plain:
        dst = tmp_path / f"enc-{f.name}"
        _encode(f, dst, ts, how)
        assert str(pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        encoded.append(dst)
    vol, refs = load_series_refs(encoded[::-1])
    assert [r.sop_instance_uid for r in refs] == [str(pydicom.dcmread(f).SOPInstanceUID) for f in plain]
    if tolerance == 0:
        np.testing.assert_array_equal(vol.array, expected)
    else:
        err = np.abs(vol.array - expected)
        assert float(err.max()) <= tolerance
        assert float(err.mean()) < 0.02 * float(np.ptp(expected))  # the image, not noise
    assert vol.spacing == pytest.approx((2.0, 0.8, 0.6))


def test_undecodable_transfer_syntax_is_named(tmp_path: Path) -> None:
    """Video (accepted by the SCP like every transfer syntax) cannot be an image
    volume: the error names the syntax instead of an opaque decoder message."""
    from pydicom.encaps import encapsulate

    files, _ = _plain_series(tmp_path, 8, n=1)
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + b"\x00" * 60])
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(SeriesError, match=r"video\.dcm: pixel data in transfer syntax 1\.2\.840\.10008\.1\.2\.4\.102 "
                                          r"\(MPEG-4 AVC/H\.264 High Profile"):
        load_series([tmp_path / "video.dcm"])
    # a lossless JPEG whose bytes are cut short: the cause, the syntax and the file
    src = tmp_path / "ok.dcm"
    _encode(files[0], src, "1.2.840.10008.1.2.4.70", ["dcmcjpeg", "+e1"])
    broken = pydicom.dcmread(src)
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 8])
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    with pytest.raises(SeriesError, match=r"broken\.dcm: cannot decode pixel data in transfer syntax 1\.2\.840\.10008\.1\.2\.4\.70"):
        load_series([tmp_path / "broken.dcm"])
