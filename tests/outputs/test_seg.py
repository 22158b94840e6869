"""Binary SEG: round trip through highdicom, per-frame references, dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from outgen import ALGORITHM, SOURCES, decode_by_reference, prediction_for, synthetic_series, write_series
from worker.outputs.build import build_outputs, uid_factory, write_outputs
from worker.outputs.seg import build_seg
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceError, SourceSeries
from worker.outputs.validate import run_dciodvfy


def _boxes(shape: tuple[int, int, int]) -> list[tuple[slice, slice, slice]]:
    z, y, x = shape
    if z == 1:
        return [(slice(0, 1), slice(y // 4, y // 2), slice(x // 4, x // 2))]
    return [(slice(2, 4), slice(3, 9), slice(4, 8)), (slice(z - 1, z), slice(y - 6, y - 2), slice(x - 5, x - 1))]


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize("omit", [False, True], ids=["all-frames", "omit-empty"])
def test_seg_round_trip(name: str, omit: bool, tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    source = SourceSeries.from_datasets(SOURCES[name]())
    pred = prediction_for(source, _boxes(source.shape))
    settings = out_settings.model_copy(update={"seg_omit_empty_frames": omit})
    seg = build_seg(source, pred.mask, algorithm=ALGORITHM,
                    uids=uid_factory(7, source, ALGORITHM, settings), settings=settings)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)

    errors, _warnings = run_dciodvfy(path, dciodvfy)
    assert errors == []

    back = hd.seg.segread(path)
    assert back.SegmentationType == "BINARY"
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    expected_frames = int(pred.mask.reshape(source.num_slices, -1).any(axis=1).sum()) if omit else source.num_slices
    assert int(back.NumberOfFrames) == expected_frames
    # every frame goes back to the right source slice, at the right position
    np.testing.assert_array_equal(decode_by_reference(back, source) > 0, pred.mask)
    # highdicom's own decoding by source instance agrees (single-frame sources)
    if not source.is_multiframe:
        uids = [s.sop_instance_uid for s in source.slices]
        vol = back.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=True,
                                                assert_missing_frames_are_empty=omit)
        np.testing.assert_array_equal(vol > 0, pred.mask)
    else:
        frames = [s.frame_number for s in source.slices]
        vol = back.get_pixels_by_source_frame(source.slices[0].sop_instance_uid, frames,
                                              segment_numbers=[1], combine_segments=True,
                                              assert_missing_frames_are_empty=omit)
        np.testing.assert_array_equal(vol > 0, pred.mask)

    # references to the source series (OHIF needs ReferencedSeriesSequence)
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_instance_uid
    referenced = {i.ReferencedSOPInstanceUID for i in back.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.sop_instance_uid for s in source.slices}
    assert back.FrameOfReferenceUID == source.frame_of_reference_uid


def test_mask_on_known_slices_of_shuffled_series(tmp_path: Path, out_settings: OutputSettings) -> None:
    """Instances given in shuffled order (InstanceNumber unrelated to position):
    a mask on slices 1 and 5 comes back on exactly those instances and pixels."""
    datasets = synthetic_series(modality="CT", n=7, shuffle=True, seed=11)
    by_z = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    source = SourceSeries.from_datasets(datasets)
    assert [s.sop_instance_uid for s in source.slices] == [d.SOPInstanceUID for d in by_z]
    mask = np.zeros(source.shape, bool)
    mask[1, 2:5, 3:6] = True
    mask[5, 10, 11] = True
    seg = build_seg(source, mask, algorithm=ALGORITHM, uids=uid_factory(1, source, ALGORITHM, out_settings),
                    settings=out_settings.model_copy(update={"seg_omit_empty_frames": True}))
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    back = hd.seg.segread(path)
    assert int(back.NumberOfFrames) == 2
    hits = {}
    for k, frame in enumerate(back.PerFrameFunctionalGroupsSequence):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        hits[ref] = np.argwhere(back.pixel_array[k] > 0).tolist()
    assert hits == {
        by_z[1].SOPInstanceUID: [[r, c] for r in range(2, 5) for c in range(3, 6)],
        by_z[5].SOPInstanceUID: [[10, 11]],
    }


def test_source_order_matches_engine(tmp_path: Path) -> None:
    """SourceSeries sorts slices exactly like the engine's reader."""
    from worker.engine.dicom_io import load_series_refs

    paths = write_series(synthetic_series(modality="MR", n=6, shuffle=True, seed=5), tmp_path / "src")
    _vol, refs = load_series_refs(paths)
    default = SourceSeries.from_files(paths)
    explicit = SourceSeries.from_files(paths, order=refs)
    assert [s.sop_instance_uid for s in default.slices] == [r.sop_instance_uid for r in refs]
    assert [s.sop_instance_uid for s in explicit.slices] == [r.sop_instance_uid for r in refs]


def test_segment_description_and_identity(out_settings: OutputSettings) -> None:
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, _boxes(source.shape))
    seg = build_seg(source, pred.mask, algorithm=ALGORITHM, uids=uid_factory(3, source, ALGORITHM, out_settings),
                    settings=out_settings)
    item = seg.SegmentSequence[0]
    assert item.SegmentNumber == 1 and item.SegmentLabel == "Anomaly"
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.MorphologicallyAbnormalStructure.value
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Lesion.value
    alg = item.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == ALGORITHM.name and alg.AlgorithmVersion == ALGORITHM.version
    assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == codes.DCM.ArtificialIntelligence.value
    assert ALGORITHM.checksum in str(alg.AlgorithmParameters)
    assert "NOT FOR CLINICAL USE" in seg.SeriesDescription and "NOT FOR CLINICAL USE" in seg.ContentDescription
    assert seg.SeriesNumber == out_settings.seg_series_number
    assert seg.Manufacturer == "pacs-node" and seg.SoftwareVersions == ALGORITHM.version


@pytest.mark.parametrize("charset,name", [("ISO_IR 192", "Müller^Jürgen=ミュラー"), ("ISO_IR 100", "Dürr^Zoë")])
def test_patient_and_study_copied(charset: str, name: str, tmp_path: Path, out_settings: OutputSettings) -> None:
    datasets = synthetic_series(modality="MR", charset=charset, patient_name=name.split("=")[0] if charset == "ISO_IR 100" else name)
    src_paths = write_series(datasets, tmp_path / "src")
    source = SourceSeries.from_files(src_paths)
    pred = prediction_for(source, _boxes(source.shape))
    built = build_outputs(job_id=5, source=source, prediction=pred, algorithm=ALGORITHM, settings=out_settings)
    written = write_outputs(built, tmp_path / "out" / "5", settings=out_settings)
    ref = pydicom.dcmread(src_paths[0])
    for w in written:
        ds = pydicom.dcmread(w.path)
        assert ds.SpecificCharacterSet == charset, w.kind
        assert str(ds.PatientName) == str(ref.PatientName), w.kind
        for key in ("PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyInstanceUID", "StudyDate", "StudyTime"):
            assert ds.get(key) == ref.get(key), (w.kind, key)
        assert str(ds.ReferringPhysicianName) == "Ref^Doctor", w.kind
        assert ds.SeriesInstanceUID != ref.SeriesInstanceUID


def test_source_without_type2_attributes_is_not_modified() -> None:
    """Sources lacking Type 2 patient/study attributes still work; the inputs are not mutated."""
    datasets = synthetic_series(modality="CT", n=3)
    for ds in datasets:
        for key in ("PatientBirthDate", "PatientSex", "StudyID", "ReferringPhysicianName"):
            delattr(ds, key)
    source = SourceSeries.from_datasets(datasets)
    seg = build_seg(source, np.ones(source.shape, bool), algorithm=ALGORITHM,
                    uids=uid_factory(1, source, ALGORITHM, OutputSettings()), settings=OutputSettings())
    assert seg.PatientSex == "" or "PatientSex" in seg
    assert all("PatientSex" not in ds for ds in datasets)


def test_shape_mismatch_and_bad_sources() -> None:
    datasets = synthetic_series(modality="CT", n=4)
    source = SourceSeries.from_datasets(datasets)
    with pytest.raises(SourceError, match="shape"):
        build_seg(source, np.zeros((3, 24, 20), bool), algorithm=ALGORITHM,
                  uids=uid_factory(1, source, ALGORITHM, OutputSettings()), settings=OutputSettings())
    other = synthetic_series(modality="CT", n=2)
    with pytest.raises(SourceError, match="series"):
        SourceSeries.from_datasets(datasets + other)
    with pytest.raises(SourceError, match="order"):
        SourceSeries.from_datasets(datasets, order=[source.slices[0]])


@pytest.mark.parametrize("omit", [False, True], ids=["all-frames", "omit-empty"])
def test_one_segment_per_finding(omit: bool, tmp_path: Path, out_settings: OutputSettings, dciodvfy: str) -> None:
    """Three findings (two on one slice): three segments "Anomaly 1..3", each
    holding exactly its finding's voxels on its own source slices, distinct
    colours, tracking UIDs shared with the SR's groups."""
    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, [(slice(1, 3), slice(2, 7), slice(3, 9)), (slice(2, 3), slice(15, 20), slice(12, 16)),
                                   (slice(6, 8), slice(10, 12), slice(2, 5))])
    assert len(pred.findings) == 3
    settings = out_settings.model_copy(update={"seg_omit_empty_frames": omit})
    built = build_outputs(job_id=8, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings)
    written = write_outputs(built, tmp_path / "8", settings=settings)  # the gate re-reads every segment's voxels
    seg_path = written[0].path
    assert run_dciodvfy(seg_path, dciodvfy)[0] == []
    back = hd.seg.segread(seg_path)
    findings = sorted(pred.findings, key=lambda f: f.label)
    assert [int(s.SegmentNumber) for s in back.SegmentSequence] == [1, 2, 3]
    assert [s.SegmentLabel for s in back.SegmentSequence] == [f"Anomaly {f.label}" for f in findings]
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in back.SegmentSequence}
    assert len(colours) == 3
    uids = [s.sop_instance_uid for s in source.slices]
    for number, finding in enumerate(findings, start=1):
        vol = back.get_pixels_by_source_instance(uids, segment_numbers=[number], combine_segments=True,
                                                 assert_missing_frames_are_empty=omit)
        z0, y0, x0, z1, y1, x1 = finding.bbox_zyx
        expected = np.zeros_like(pred.mask)
        expected[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = pred.mask[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1]
        assert int(expected.sum()) == finding.voxel_count
        np.testing.assert_array_equal(vol > 0, expected)
    # every frame belongs to one segment and one source image, at that image's position
    seen = set()
    for frame in back.PerFrameFunctionalGroupsSequence:
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = uids.index(src)
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   source.slices[z].position, atol=1e-3)
        seen.add((number, z))
    if omit:  # only the slices each finding lies on
        assert seen == {(n, z) for n, f in enumerate(findings, start=1) for z in range(f.bbox_zyx[0], f.bbox_zyx[3] + 1)}
    else:
        assert seen == {(n, z) for n in (1, 2, 3) for z in range(source.num_slices)}
    # the SR group of each finding references its segment and tracks it with the same UID
    sr = hd.sr.Comprehensive3DSR.from_dataset(built[1].dataset)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) for g in groups] == [1, 2, 3]
    assert [g.tracking_uid for g in groups] == [s.TrackingUID for s in back.SegmentSequence]


def test_findings_that_do_not_match_the_mask_are_refused() -> None:
    from worker.outputs.regions import label_findings

    source = SourceSeries.from_datasets(SOURCES["ct-single"]())
    pred = prediction_for(source, [(slice(1, 3), slice(2, 7), slice(3, 9))])
    (finding,) = pred.findings
    stray = pred.mask.copy()
    stray[7, 20, 15] = True  # a voxel outside every finding's box
    with pytest.raises(ValueError, match="outside every finding"):
        label_findings(stray, pred.findings)
    wrong = type(finding)(**{**finding.__dict__, "voxel_count": finding.voxel_count + 1})
    with pytest.raises(ValueError, match="voxel"):
        label_findings(pred.mask, [wrong])
