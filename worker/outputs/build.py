"""Build, write, validate and record all outputs of one job.

::

    source = SourceSeries.from_files(paths, order=frame_refs)
    built = build_outputs(job_id=job.id, source=source, prediction=prediction,
                          algorithm=AlgorithmInfo.from_predictor(predictor, prediction.threshold),
                          settings=OutputSettings.model_validate(settings.outputs))
    written = write_outputs(built, outputs_root / str(job.id), settings=output_settings)
    with db.session() as s:
        save_output_rows(s, job.id, written, outputs_root)

Nothing found (no finding and an empty mask): the SR is still produced and
states the absence; the SEG is omitted (``seg_when_empty = "omit"``, default)
or empty (``"empty"``); the anomaly map follows ``anomaly_map_when_empty``;
there is no overlay.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import delete
from sqlalchemy.orm import Session

from pacs_node.db.models import Output

from .anomaly_map import build_anomaly_map
from .overlay import build_overlay
from .regions import finding_regions, label_findings
from .seg import build_seg
from .settings import OutputSettings
from .source import SourceSeries
from .sr import build_sr
from .types import AlgorithmInfo, BuiltOutput, PredictionLike, PredictorLike
from .uids import UIDFactory
from .gate import SourceCheck, check_source, flagged_keywords
from .validate import ValidationReport, find_dciodvfy, validate_file

if TYPE_CHECKING:
    from pacs_node.config import Settings

__all__ = [
    "JobOutputs",
    "WrittenOutput",
    "build_job_outputs",
    "build_outputs",
    "check_and_fix_source",
    "produce_outputs",
    "save_output_rows",
    "uid_factory",
    "write_outputs",
]

log = logging.getLogger(__name__)


@dataclass
class WrittenOutput:
    """A built output on disk, validated.

    ``relpath`` is ``<job dir name>/<file name>``: relative to the outputs
    root when the job's directory is ``<outputs root>/<job id>``, which is what
    ``outputs.path`` stores.
    """

    built: BuiltOutput
    path: Path
    size_bytes: int
    sha256: str
    report: ValidationReport

    @property
    def kind(self) -> str:
        return self.built.kind

    @property
    def sop_instance_uid(self) -> str:
        return self.built.sop_instance_uid

    @property
    def sop_class_uid(self) -> str:
        return self.built.sop_class_uid

    @property
    def series_instance_uid(self) -> str:
        return self.built.series_instance_uid

    @property
    def relpath(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def validation(self) -> str:
        """JSON summary for ``outputs.validation``."""
        return self.report.to_json()


class JobOutputs(list[WrittenOutput]):
    """The written outputs of a job, with what the gate found in the source.

    Attributes
    ----------
    source_check:
        dciodvfy's verdict on one source instance (``None`` when dciodvfy
        did not run).
    header_fixes:
        What was changed in the copy of the source header the outputs were
        built from (:mod:`worker.outputs.headers`).
    """

    def __init__(self, written: Sequence[WrittenOutput], source_check: SourceCheck | None = None,
                 header_fixes: Sequence[Any] = ()) -> None:
        super().__init__(written)
        self.source_check = source_check
        self.header_fixes = list(header_fixes)

    def validation(self) -> dict[str, Any]:
        """The job's validation record (``jobs.findings["validation"]``), without patient data.

        ``source``: dciodvfy's errors on the checked source instance;
        ``fixes``: each repaired attribute (name, Type, action, rule);
        ``inherited``: per output kind, the source errors it still carries.
        """
        inherited: dict[str, list[str]] = {}
        for w in self:
            lines = w.report.to_dict()["inherited"]
            if lines:
                inherited.setdefault(w.kind, [])
                inherited[w.kind] += [x for x in lines if x not in inherited[w.kind]]
        return {
            "source": self.source_check.to_dict() if self.source_check is not None else {"dciodvfy": "not run"},
            "fixes": [f.to_dict() for f in self.header_fixes],
            "inherited": inherited,
        }


def check_and_fix_source(source: SourceSeries, settings: OutputSettings) -> SourceCheck | None:
    """Check one source instance with dciodvfy (once per series) and repair what it flags.

    Attributes that dciodvfy rejects although the node's own value checks
    accept them are repaired too (``source_header_fixes = "fix"``). Returns
    ``None`` when dciodvfy is off or not installed.
    """
    if not settings.dciodvfy:
        return None
    exe = find_dciodvfy(settings.dciodvfy_path)
    if exe is None:
        return None
    check = check_source(source, exe, settings.dciodvfy_timeout)
    if check.errors:
        source.fix_flagged(flagged_keywords(check))
        log.info("source series: dciodvfy reports %d error(s) on one instance; %d header value(s) repaired",
                 len(check.errors), len([f for f in source.header_fixes if f.action != "kept"]))
    return check


def uid_factory(job_id: int, source: SourceSeries, algorithm: AlgorithmInfo, settings: OutputSettings) -> UIDFactory:
    """The UID factory of a job's outputs."""
    return UIDFactory(
        root=settings.uid_root,
        job_id=int(job_id),
        model_version=algorithm.version,
        study_uid=source.study_instance_uid,
        source_series_uid=source.series_instance_uid,
    )


def build_outputs(
    *,
    job_id: int,
    source: SourceSeries,
    prediction: PredictionLike,
    algorithm: AlgorithmInfo,
    settings: OutputSettings,
) -> list[BuiltOutput]:
    """Build every configured output of a job result (in memory).

    Parameters
    ----------
    job_id:
        Node job id (enters every UID).
    source:
        Source series, in the slice order of the prediction's arrays.
    prediction:
        ``mask``, ``anomaly_map``, ``findings``, ``study_score``; its
        optional ``domain`` (the training-domain check) goes into the SR.
    algorithm:
        Name, version (enters every UID), checksum, threshold.
    settings:
        ``[outputs]`` settings.

    Returns
    -------
    list[BuiltOutput]
        In delivery order: SEG, SR (right after the SEG it references), then
        map and overlay images, so the result a radiologist reads first
        arrives before the large secondary objects.

    Raises
    ------
    SourceError
        Arrays not shaped like the source series.
    ValueError
        Findings without mask voxels, mask voxels without findings, or
        findings that do not match the mask's regions.
    """
    mask = np.asarray(prediction.mask, dtype=bool)
    source.check_shape(mask, "mask")
    findings = list(prediction.findings)
    found = bool(mask.any())
    if found != bool(findings):
        raise ValueError(
            f"inconsistent prediction: {len(findings)} finding(s) but {int(mask.sum())} mask voxel(s)"
        )
    labels, ordered = label_findings(mask, findings)
    regions = finding_regions(labels, ordered)
    per_finding = settings.seg_segments == "per_finding" and bool(ordered)
    uids = uid_factory(job_id, source, algorithm, settings)
    out: list[BuiltOutput] = []
    seg: Dataset | None = None
    if found or settings.seg_when_empty == "empty":
        seg = build_seg(source, mask, algorithm=algorithm, uids=uids, settings=settings,
                        findings=ordered, labels=labels)
        sums = [int(r.finding.voxel_count) for r in regions] if per_finding else [int(mask.sum())]
        out.append(BuiltOutput("seg", seg, "seg.dcm", {"mask_sum": int(mask.sum()), "frames": int(seg.NumberOfFrames),
                                                       "segment_sums": sums}))
    sr = build_sr(
        source,
        regions=regions,
        study_score=float(prediction.study_score),
        seg=seg,
        algorithm=algorithm,
        uids=uids,
        settings=settings,
        # Engines before the training-domain check have no ``domain``.
        domain=getattr(prediction, "domain", None) or None,
        segment_of=None if per_finding else {r.label: 1 for r in regions},
    )
    out.append(BuiltOutput("sr", sr, "sr.dcm", {"findings": len(findings)}))
    if settings.anomaly_map != "none" and (found or settings.anomaly_map_when_empty):
        amap = build_anomaly_map(source, prediction.anomaly_map, algorithm=algorithm, uids=uids, settings=settings)
        if amap is not None:
            out.append(BuiltOutput("map", amap, "map.dcm", {"frames": source.num_slices}))
    if settings.overlay and found:
        for i, img in enumerate(build_overlay(source, mask, uids=uids, settings=settings), start=1):
            out.append(BuiltOutput("overlay", img, f"overlay-{i:04d}.dcm"))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_outputs(
    outputs: list[BuiltOutput],
    directory: str | Path,
    *,
    settings: OutputSettings,
    validate: bool = True,
    source_check: SourceCheck | None = None,
) -> list[WrittenOutput]:
    """Write each output to ``directory/<filename>`` (atomically) and validate it.

    ``source_check`` (:func:`check_and_fix_source`) lets the gate tell the
    errors the outputs inherited from the source from those the node made.

    ``.dcm`` files in ``directory`` from an earlier build that this build did
    not produce are removed, so the directory always holds exactly the
    current outputs.

    Raises
    ------
    OutputValidationError
        The first output that fails the gate (files are left for inspection).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = {o.filename for o in outputs}
    for stale in directory.glob("*.dcm"):
        if stale.name not in names:
            stale.unlink()
    def check(path: Path, o: BuiltOutput) -> ValidationReport:
        if not validate:
            return ValidationReport(kind=o.kind, filename=o.filename, reread="skipped")
        return validate_file(
            path,
            o,
            use_dciodvfy=settings.dciodvfy,
            dciodvfy_path=settings.dciodvfy_path,
            require_dciodvfy=settings.require_dciodvfy,
            timeout=settings.dciodvfy_timeout,
            source_check=source_check,
        )

    # Each file is validated (re-read + dciodvfy, a subprocess) in a thread
    # while the next one is written; results are collected in order, so the
    # first failing output is the one reported.
    pending: list[tuple[BuiltOutput, Path, Future[ValidationReport]]] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="validate") as pool:
        for o in outputs:
            path = directory / o.filename
            tmp = directory / f".{o.filename}.tmp"
            o.dataset.save_as(tmp, enforce_file_format=True)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            pending.append((o, path, pool.submit(check, path, o)))
        written = [WrittenOutput(o, path, path.stat().st_size, _sha256(path), fut.result()) for o, path, fut in pending]
    return written


def produce_outputs(
    *,
    job_id: int,
    source: SourceSeries,
    prediction: PredictionLike,
    algorithm: AlgorithmInfo,
    settings: OutputSettings,
    outputs_root: str | Path,
) -> list[WrittenOutput]:
    """:func:`check_and_fix_source` + :func:`build_outputs` + :func:`write_outputs` into ``outputs_root/<job_id>/``."""
    check = check_and_fix_source(source, settings)
    built = build_outputs(job_id=job_id, source=source, prediction=prediction, algorithm=algorithm, settings=settings)
    written = write_outputs(built, Path(outputs_root) / str(int(job_id)), settings=settings, source_check=check)
    return JobOutputs(written, check, source.header_fixes)


def build_job_outputs(
    *,
    job_id: int,
    source_paths: Sequence[str | Path],
    prediction: PredictionLike,
    predictor: PredictorLike,
    settings: Settings,
    out_dir: str | Path,
    order: Sequence[Any] | None = None,
    source_headers: Sequence[Dataset] | None = None,
) -> list[WrittenOutput]:
    """The worker's entry point: read the source files, build, write and validate.

    Parameters
    ----------
    job_id:
        Node job id.
    source_paths:
        Files of the source series (any order).
    prediction:
        The engine's prediction on that series.
    predictor:
        The loaded model (``model_name``, ``model_version``, ``checksum``).
    settings:
        Node settings; ``settings.outputs`` is validated as :class:`OutputSettings`.
    out_dir:
        The job's output directory, ``<outputs root>/<job id>``.
    order:
        Optional engine slice references (``load_series_refs``); default: the
        engine's sort rule.
    source_headers:
        The headers the engine's loader already read
        (``load_series_headers``), one per path in ``source_paths`` order;
        default: read them from the files.

    Returns
    -------
    JobOutputs
        The written outputs; :meth:`JobOutputs.validation` is the job's
        validation record.

    Raises
    ------
    OutputValidationError
        An output failed the validation gate.
    SourceError
        The source files cannot be used to build outputs.
    """
    out_settings = OutputSettings.model_validate(settings.outputs or {})
    repair = out_settings.source_header_fixes == "fix"
    if source_headers is None:
        source = SourceSeries.from_files(source_paths, order=order, repair_headers=repair)
    else:
        if len(source_headers) != len(source_paths):
            raise ValueError(f"{len(source_headers)} header(s) for {len(source_paths)} source file(s)")
        files = {str(ds.get("SOPInstanceUID", "")): Path(p) for ds, p in zip(source_headers, source_paths)}
        source = SourceSeries.from_datasets(source_headers, order=order, files=files, repair_headers=repair)
    check = check_and_fix_source(source, out_settings)
    algorithm = AlgorithmInfo.from_predictor(predictor, threshold=float(prediction.threshold))
    built = build_outputs(job_id=job_id, source=source, prediction=prediction, algorithm=algorithm, settings=out_settings)
    written = write_outputs(built, out_dir, settings=out_settings, source_check=check)
    return JobOutputs(written, check, source.header_fixes)


def save_output_rows(session: Session, job_id: int, written: list[WrittenOutput], outputs_root: str | Path) -> list[Output]:
    """Replace the job's ``outputs`` rows with ``written`` (paths relative to ``outputs_root``)."""
    root = Path(outputs_root).resolve()
    session.execute(delete(Output).where(Output.job_id == job_id))
    session.flush()
    rows = []
    for w in written:
        row = Output(
            job_id=job_id,
            kind=w.kind,
            sop_class_uid=w.built.sop_class_uid,
            sop_instance_uid=w.built.sop_instance_uid,
            series_instance_uid=w.built.series_instance_uid,
            path=w.path.resolve().relative_to(root).as_posix(),
            size_bytes=w.size_bytes,
            sha256=w.sha256,
            validation=w.validation,
        )
        session.add(row)
        rows.append(row)
    session.flush()
    return rows
