"""Seeding helpers for the API tests: real studies ingested into a real node,
jobs created by the real assembler, states moved through the state machine,
and a real DICOM SEG built with highdicom."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_factory import make_instance, to_bytes
from nodetest import TEST_AUTH, TEST_TOKEN
from pacs_node.assemble.scheduler import StudyAssembler
from pacs_node.config import StudySettings
from pacs_node.db.models import DeliveryAttempt, Job, Output, utcnow
from pacs_node.ingest.recorder import parse_meta
from pacs_node.jobs.states import JobState, transition
from pacs_node.node import Node

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: The token of nodetest.make_settings (scopes read and write).
TOKEN = TEST_TOKEN
AUTH = TEST_AUTH


@dataclass
class Seeded:
    """Three jobs: ``done`` (timings, findings, outputs, deliveries),
    ``failed`` and ``queued``, one study each."""

    node: Node
    done: int
    failed: int
    queued: int
    study_uids: dict[int, str]


TIMINGS = {"queue_wait": 0.2, "load": 1.5, "inference": 12.0, "postprocess": 0.7, "build": 0.4, "delivery": 3.0}
FINDINGS = {
    "count": 2,
    "items": [
        {"volume_mm3": 120.5, "max_score": 0.93, "mean_score": 0.71, "centroid": [10.0, 12.0, 4.0]},
        {"volume_mm3": 8.0, "max_score": 0.61, "mean_score": 0.55, "centroid": [3.0, 5.0, 2.0]},
    ],
}


def seed(node: Node) -> Seeded:
    """Ingest three studies, create their jobs and move them to their states."""
    for _ in range(3):
        ingest(node, gradient_series(4, 16, 16))
    jobs = sorted(assemble(node))
    assert len(jobs) == 3
    by_study: dict[int, str] = {}
    with node.db.sessionmaker() as s:
        for j in jobs:
            job = s.get(Job, j)
            assert job is not None and job.state == "queued"
            by_study[j] = job.study.study_instance_uid
    done, failed, queued = jobs
    advance(node, done, JobState.RUNNING, JobState.DELIVERING, JobState.DONE,
            timings=TIMINGS, findings=FINDINGS, study_score=0.93, worker_host="gpu-1")
    advance(node, failed, JobState.RUNNING, JobState.FAILED, timings={"queue_wait": 0.1, "load": 0.3},
            error="RuntimeError: CUDA out of memory")
    add_delivery(node, done, "PACS", 1, "error", None)
    add_delivery(node, done, "PACS", 2, "success", 0)
    return Seeded(node=node, done=done, failed=failed, queued=queued, study_uids=by_study)


class FakeDispatcher:
    """Records the tasks it is asked to enqueue."""

    def __init__(self) -> None:
        self.process: list[int] = []
        self.deliver: list[int] = []

    def enqueue_process(self, job_id: int) -> None:
        self.process.append(job_id)

    def enqueue_delivery(self, job_id: int) -> None:
        self.deliver.append(job_id)


def gradient_series(
    n_slices: int = 5, rows: int = 24, cols: int = 32, *, modality: str = "CT", study_uid: str | None = None
) -> list[Dataset]:
    """One series of real CT/MR slices with a diagonal gradient (not uniform),
    given in shuffled instance order (slice ``i`` is at z = ``2 * i``)."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    yy, xx = np.mgrid[0:rows, 0:cols]
    for i in reversed(range(n_slices)):
        ds = make_instance(
            study_uid=study_uid, series_uid=series_uid, modality=modality, instance_number=n_slices - i,
            rows=rows, cols=cols, z=2.0 * i,
        )
        # Type 2 attributes highdicom copies into derived objects.
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.ReferringPhysicianName = "", "", "1", ""
        pixels = (xx * 20 + yy * 10 + i * 5).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def ingest(node: Node, datasets: Sequence[Dataset]) -> None:
    """Store instances as the DIMSE server would."""
    for ds in datasets:
        data = to_bytes(ds)
        node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet="MODALITY")


def assemble(node: Node) -> list[int]:
    """Create the jobs of every received study (the assembler, with a clock
    one minute ahead so that every study counts as stable)."""
    assembler = StudyAssembler(
        node.db, StudySettings(stable_seconds=1), clock=lambda: utcnow() + dt.timedelta(seconds=60)
    )
    return assembler.tick()


def advance(node: Node, job_id: int, *states: JobState, **fields: Any) -> None:
    """Move a job through ``states`` (each a legal transition) and set columns."""
    with node.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        for state in states:
            transition(s, job, state, f"test: {state.value}")
        for key, value in fields.items():
            setattr(job, key, value)


def add_output(node: Node, job_id: int, kind: str, relpath: str, sop_uid: str, series_uid: str) -> None:
    """Record an output file (already written under ``<data_dir>/outputs``)."""
    path = node.settings.data_dir / "outputs" / relpath
    data = path.read_bytes() if path.exists() else b""
    with node.db.session() as s:
        s.add(
            Output(
                job_id=job_id, kind=kind, sop_class_uid=SEG_STORAGE, sop_instance_uid=sop_uid,
                series_instance_uid=series_uid, path=relpath, size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(), validation="ok",
            )
        )


def add_delivery(node: Node, job_id: int, destination: str, attempt: int, status: str, code: int | None) -> None:
    with node.db.session() as s:
        s.add(
            DeliveryAttempt(
                job_id=job_id, destination=destination, attempt=attempt, status=status, status_code=code,
                error=None if status == "success" else "association rejected",
                details={"instances": 2}, finished_at=utcnow(),
            )
        )


def build_seg(source: Sequence[Dataset], mask: NDArray[np.bool_], *, omit_empty_frames: bool = False) -> Dataset:
    """A BINARY DICOM SEG of ``mask`` (frames in ``source`` order) with one segment."""
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="test", family=codes.DCM.ArtificialIntelligence, version="1"
        ),
    )
    return hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=9901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pacs-node-test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=omit_empty_frames,
    )


def save_seg_output(node: Node, job_id: int, seg: Dataset) -> Path:
    """Write a SEG under the outputs directory and record its Output row."""
    relpath = f"job-{job_id}/seg.dcm"
    path = node.settings.data_dir / "outputs" / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    add_output(node, job_id, "seg", relpath, seg.SOPInstanceUID, seg.SeriesInstanceUID)
    return path
