"""The node's outputs read by the viewers' own parsers.

* OHIF: dcmjs and ``@cornerstonejs/adapters`` from npm (the code OHIF runs in
  the browser), driven by ``js/viewers.mjs`` in Node: the SEG's segment
  volumes, the Parametric Map on the source grid, one SR tool state per
  finding on its key slice; and the FRACTIONAL map refused, as the docs say.
* 3D Slicer: dcmqi's ``segimage2itkimage`` and ``paramap2itkimage`` (PyPI).
* PixelMed: ``DicomSRValidator`` on the SR, ``DicomInstanceValidator`` on the SEG.

Each tool is required (``nodetest.require``): in CI a missing one fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from nodetest import require, require_tool
from outgen import ALGORITHM, OUT_OF_DOMAIN, SOURCES, Prediction, prediction_for, write_series
from worker.outputs.build import JobOutputs, produce_outputs
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceSeries

JS = Path(__file__).parent / "js"
#: two findings of different sizes on different slices; the larger one spans 3 slices
BOXES = [(slice(1, 4), slice(2, 9), slice(3, 10)), (slice(6, 7), slice(15, 19), slice(12, 16))]


@pytest.fixture(scope="session")
def node_parsers() -> Path:
    """``js/node_modules`` installed from ``js/package-lock.json`` (``npm ci``, once per lock file)."""
    require_tool("node")
    npm = require_tool("npm")
    lock = (JS / "package-lock.json").read_bytes()
    stamp = JS / "node_modules" / ".pacs-node-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        res = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                             capture_output=True, text=True, timeout=300)
        require(res.returncode == 0, f"npm packages of tests/outputs/js (npm ci: {res.stderr[-500:]})")
        stamp.write_text(digest)
    return JS


@dataclass
class Job:
    source: SourceSeries
    paths: list[Path]
    prediction: Prediction
    written: JobOutputs

    def path(self, kind: str) -> Path:
        return next(w.path for w in self.written if w.kind == kind)

    def z_of(self, index: int) -> int:
        """z of the source file ``paths[index]`` (the order the parsers were given)."""
        uid = str(pydicom.dcmread(self.paths[index], stop_before_pixels=True).SOPInstanceUID)
        return [s.sop_instance_uid for s in self.source.slices].index(uid)


def _job(tmp: Path, anomaly_map: str, dciodvfy: str) -> Job:
    paths = write_series(SOURCES["ct-single"](), tmp / "src")  # shuffled instance order
    source = SourceSeries.from_files(paths)
    pred = prediction_for(source, BOXES)
    pred.domain = OUT_OF_DOMAIN
    settings = OutputSettings(require_dciodvfy=True, dciodvfy_path=dciodvfy, anomaly_map=anomaly_map)  # type: ignore[arg-type]
    written = produce_outputs(job_id=21, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings,
                              outputs_root=tmp / "out")
    assert isinstance(written, JobOutputs)
    return Job(source, paths, pred, written)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, dciodvfy: str) -> Job:
    return _job(tmp_path_factory.mktemp("viewers"), "parametric", dciodvfy)


def _parse(parsers: Path, tmp: Path, job: Job, **files: Path | None) -> dict:
    manifest = tmp / "manifest.json"
    manifest.write_text(json.dumps({"source": [str(p) for p in job.paths],
                                    **{k: str(v) if v else None for k, v in files.items()}}))
    res = subprocess.run([require_tool("node"), str(parsers / "viewers.mjs"), str(manifest)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(json.loads(res.stdout))


def test_ohif_adapters_load_seg_map_and_sr(node_parsers: Path, job: Job, tmp_path: Path) -> None:
    out = _parse(node_parsers, tmp_path, job, seg=job.path("seg"), map=job.path("map"), sr=job.path("sr"))
    findings = sorted(job.prediction.findings, key=lambda f: f.label)
    mask = job.prediction.mask

    # SEG: one non-empty segment per finding, on exactly the source images it lies on
    seg = out["seg"]
    assert "error" not in seg, seg
    assert sorted(seg["segments"]) == ["1", "2"] and not seg["overlapping"]
    for number, finding in enumerate(findings, start=1):
        got = seg["segments"][str(number)]
        assert got["label"] == f"Anomaly {finding.label}"
        assert got["voxels"] == finding.voxel_count > 0
        assert sorted(job.z_of(i) for i in got["images"]) == list(range(finding.bbox_zyx[0], finding.bbox_zyx[3] + 1))

    # Parametric Map: the score on the source grid, image by image (not in stored frame order)
    pm = out["map"]
    assert "error" not in pm, pm
    rows, cols = job.source.rows, job.source.columns
    assert pm["length"] == job.source.num_slices * rows * cols and pm["nonzero"] > 0
    assert [job.z_of(i) for i in pm["images"]] == list(range(job.source.num_slices))  # the volume's slice order
    for image, total in zip(pm["images"], pm["sums"]):
        np.testing.assert_allclose(total, float(job.prediction.anomaly_map[job.z_of(image)].sum()), rtol=1e-5)

    # SR: one freehand ROI tool state per finding, on its key slice, outlining it
    tools = out["sr"]["tools"]
    assert list(tools) == ["PlanarFreehandROI"], tools
    states = tools["PlanarFreehandROI"]
    assert [s["label"] for s in states] == [f"Anomaly {f.label}" for f in findings]
    for state, finding in zip(states, findings):
        z0, y0, x0, z1, y1, x1 = finding.bbox_zyx
        region = np.zeros_like(mask)
        region[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = mask[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1]
        area = region.reshape(region.shape[0], -1).sum(axis=1)
        z = job.z_of(state["image"])
        assert area[z] == area.max()  # the key slice
        assert state["closed"] is True and state["finding"] == "Morphologically abnormal structure"
        assert state["stats"]["area"] == pytest.approx(float(area[z]))  # 1 mm pixels
        # world positions on that image's plane, around the finding's pixels
        pos = np.asarray(job.source.slices[z].position)
        world = np.asarray(state["polyline"])
        np.testing.assert_allclose(world[:, 2], pos[2], atol=1e-6)
        ys, xs = np.nonzero(region[z])
        # Cornerstone3D maps image point (x, y) to IPP + (x - 0.5, y - 0.5) pixels: pixel corners
        np.testing.assert_allclose(world[:, :2].min(axis=0), pos[:2] + [xs.min() - 0.5, ys.min() - 0.5], atol=1e-6)
        np.testing.assert_allclose(world[:, :2].max(axis=0), pos[:2] + [xs.max() + 0.5, ys.max() + 0.5], atol=1e-6)


def test_ohif_adapters_refuse_a_fractional_map(node_parsers: Path, tmp_path: Path, dciodvfy: str) -> None:
    """Why "parametric" is the default: OHIF's SEG adapter does not load FRACTIONAL SEGs."""
    fractional = _job(tmp_path, "fractional", dciodvfy)
    out = _parse(node_parsers, tmp_path, fractional, map=fractional.path("map"))
    assert out["map"] == {"error": "Fractional segmentations are not yet supported"}
    # 3D Slicer reads it: one probability volume of the score, 0..255
    import SimpleITK as sitk

    res = subprocess.run([_dcmqi("segimage2itkimage"), "--inputDICOM", str(fractional.path("map")), "--outputDirectory",
                          str(tmp_path), "--outputType", "nrrd", "--prefix", "frac"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "frac-1.nrrd"))).astype(np.float64) / 255.0
    np.testing.assert_allclose(values, fractional.prediction.anomaly_map, atol=0.5 / 255 + 1e-6)


def _dcmqi(tool: str) -> str:
    path = shutil.which(tool)
    require(path is not None, f"dcmqi's {tool} (pip install dcmqi)")
    assert path is not None
    return path


def test_slicer_dcmqi_reads_seg_and_map(job: Job, tmp_path: Path) -> None:
    import SimpleITK as sitk

    out = tmp_path / "seg"
    out.mkdir()
    res = subprocess.run([_dcmqi("segimage2itkimage"), "--inputDICOM", str(job.path("seg")), "--outputDirectory",
                          str(out), "--outputType", "nrrd", "--prefix", "seg"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    meta = json.loads((out / "seg-meta.json").read_text())
    labels = [a["SegmentLabel"] for group in meta["segmentAttributes"] for a in group]
    findings = sorted(job.prediction.findings, key=lambda f: f.label)
    assert labels == [f"Anomaly {f.label}" for f in findings]
    first = np.asarray(job.source.slices[0].position)
    for number, finding in enumerate(findings, start=1):
        image = sitk.ReadImage(str(out / f"seg-{number}.nrrd"))
        voxels = sitk.GetArrayFromImage(image)  # (z, y, x) in Slicer's volume
        assert int(np.count_nonzero(voxels)) == finding.voxel_count
        # the volume sits where the source does: first slice's origin, its spacing
        np.testing.assert_allclose(image.GetSpacing(), (1.0, 1.0, 2.5), atol=1e-4)
        z_in_slicer = np.flatnonzero(voxels.reshape(voxels.shape[0], -1).any(axis=1))
        origin_z = image.GetOrigin()[2]
        zs = sorted({int(round((origin_z + 2.5 * k - first[2]) / 2.5)) for k in z_in_slicer})
        assert zs == list(range(finding.bbox_zyx[0], finding.bbox_zyx[3] + 1))

    out = tmp_path / "map"
    out.mkdir()
    res = subprocess.run([_dcmqi("paramap2itkimage"), "--inputDICOM", str(job.path("map")), "--outputDirectory",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    image = sitk.ReadImage(str(out / "pmap.nrrd"))
    values = sitk.GetArrayFromImage(image)
    np.testing.assert_allclose(image.GetOrigin(), first, atol=1e-4)
    # Slicer's volume runs along the slice normal from the first slice: the engine's z order
    np.testing.assert_allclose(values, job.prediction.anomaly_map, atol=1e-7)


def test_pixelmed_validates_sr_and_seg(job: Job, pixelmed: str) -> None:
    from outgen import run_pixelmed_instance, run_pixelmed_sr

    errors, warnings = run_pixelmed_sr(job.path("sr"), pixelmed)
    assert errors == []
    # no code meaning that differs from the standard's (capitalisation included)
    assert not [w for w in warnings if "code meaning" in w], warnings
    # what is left: extension items the 2022 templates do not list
    assert warnings and all("Content Item not in template" in w for w in warnings), warnings
    errors, _ = run_pixelmed_instance(job.path("seg"), pixelmed)
    # The one SEG "error" is PixelMed leaving out the paired-structure part of
    # Laterality's condition; dciodvfy rejects the attribute in a SEG (see
    # worker.outputs.seg), and the gate follows dciodvfy.
    assert errors == ["Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute"]
