"""The worker's steps for one job: fetch -> infer -> build SEG/SR -> record,
then deliver. Plain functions taking a :class:`WorkerContext` and a job id, so
the Celery tasks (``worker.tasks``) stay thin and tests can call the steps.

Idempotence: a step only runs after it atomically claimed the job in SQL
(:mod:`pacs_node.jobs.lease`); a re-delivered task for a finished step finds
nothing to claim and returns. Output UIDs are derived from job id + kind +
model version, so re-running a job replaces its results.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_node.config import Settings
from pacs_node.db.models import Job, Study, utcnow
from pacs_node.db.session import Database
from pacs_node.jobs import lease
from pacs_node.jobs.states import JobState, transition
from pacs_node.queue import CeleryDispatcher, Dispatcher
from worker.fetch import FetchError, SeriesFiles, fetch_series_remote, fetch_series_shared
from worker.gc_pause import paused_gc
from worker.settings import WorkerSettings

__all__ = ["STAGES", "PermanentJobError", "TransientJobError", "WorkerContext", "deliver", "process"]

logger = logging.getLogger(__name__)


class TransientJobError(RuntimeError):
    """Worth retrying (database, network or broker hiccup)."""


class PermanentJobError(RuntimeError):
    """Retrying cannot help (bad series, bad model, invalid output)."""


@dataclass
class WorkerContext:
    """Per-process state: settings, database, loaded models (once per process)."""

    settings: Settings
    worker: WorkerSettings
    db: Database
    dispatcher: Dispatcher
    host: str = field(default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}")
    _predictors: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings) -> WorkerContext:
        return cls(
            settings=settings,
            worker=WorkerSettings.from_settings(settings),
            db=Database(settings.database.url),
            dispatcher=CeleryDispatcher(settings),
        )

    def predictor(self, profile: str | None) -> Any:
        """The predictor of a model profile, loaded once per process."""
        from worker.engine.predictor import Predictor

        path, device, batch_size, amp = self.worker.model_for(profile)
        key = str(path)
        with self._lock:
            if key not in self._predictors:
                t0 = time.perf_counter()
                self._predictors[key] = Predictor.from_checkpoint(path, device=device, batch_size=batch_size, amp=amp)
                logger.info("model %s loaded in %.2f s", Path(path).name, time.perf_counter() - t0)
            return self._predictors[key]

    @property
    def outputs_dir(self) -> Path:
        return self.worker.outputs_dir


class _Heartbeat:
    """Renews a job's lease in the background while a step runs."""

    def __init__(self, ctx: WorkerContext, job_id: int, state: JobState) -> None:
        self.ctx, self.job_id, self.state = ctx, job_id, state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        q = self.ctx.settings.queue
        while not self._stop.wait(q.heartbeat_seconds):
            try:
                lease.renew(self.ctx.db, self.job_id, state=self.state, lease_seconds=q.lease_seconds)
            except Exception:  # noqa: BLE001 - the next beat tries again
                logger.warning("job %d: lease renewal failed", self.job_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


#: The worker's stages, in order (``jobs.stage``; a queued job is in ``queue_wait``).
STAGES = ("queue_wait", "load", "inference", "postprocess", "build", "delivery")


def _enter_stage(ctx: WorkerContext, job_id: int, stage: str, timings: dict[str, float], *,
                 reset: bool = False, findings: dict[str, Any] | None = None,
                 study_score: float | None = None) -> None:
    """Record that ``stage`` starts now, with the timings (and findings) so far.

    Parameters
    ----------
    ctx:
        Worker context.
    job_id:
        Job id.
    stage:
        One of :data:`STAGES`.
    timings:
        Seconds of the stages finished so far (merged into ``jobs.timings``).
    reset:
        Replace ``jobs.timings`` instead of merging (a new run of the job).
    findings, study_score:
        Results known so far, kept when a later stage fails.
    """
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.RUNNING.value, JobState.DELIVERING.value):
            return
        rounded = {k: round(v, 4) for k, v in timings.items()}
        job.timings = rounded if reset else {**(job.timings or {}), **rounded}
        if reset:  # a new run: the results of a previous one no longer hold
            job.findings = {}
            job.study_score = None
        job.stage = stage
        job.stage_started_at = utcnow()
        if findings is not None:
            job.findings = findings
        if study_score is not None:
            job.study_score = study_score


def _fail(ctx: WorkerContext, job_id: int, message: str) -> None:
    """Fail a job; its timings (with the time spent in the failed stage),
    findings so far and stage are kept for the dashboard."""
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.RUNNING.value, JobState.DELIVERING.value):
            return
        timings = dict(job.timings or {})
        if job.stage and job.stage not in timings and job.stage_started_at is not None:
            timings[job.stage] = round(max(0.0, (utcnow() - job.stage_started_at).total_seconds()), 4)
            job.timings = timings
        job.error = message[:2000]
        job.lease_expires_at = None
        transition(s, job, JobState.FAILED, message[:500], host=ctx.host)


def _requeue(ctx: WorkerContext, job_id: int, message: str) -> None:
    """Give a running job back to the queue before a task retry."""
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING.value:
            return
        job.lease_expires_at = None
        job.error = message[:2000]
        transition(s, job, JobState.QUEUED, f"transient error, retrying: {message[:300]}", host=ctx.host)


def process(ctx: WorkerContext, job_id: int) -> str:
    """Run inference for a queued job and build its outputs.

    Returns
    -------
    str
        ``"not-claimed"`` when another worker has the job or it is finished,
        ``"delivering"`` when outputs were recorded and delivery was enqueued.

    Raises
    ------
    TransientJobError
        After giving the job back to the queue; the task retries it.
    """
    q = ctx.settings.queue
    if not lease.claim(ctx.db, job_id, from_state=JobState.QUEUED, to_state=JobState.RUNNING,
                       host=ctx.host, lease_seconds=q.lease_seconds, message=f"started on {ctx.host}"):
        return "not-claimed"
    try:
        with _Heartbeat(ctx, job_id, JobState.RUNNING):
            _process_claimed(ctx, job_id)
    except PermanentJobError as exc:
        logger.error("job %d failed: %s", job_id, exc)
        _fail(ctx, job_id, str(exc))
        return "failed"
    except TransientJobError as exc:
        logger.warning("job %d: transient error: %s", job_id, exc)
        _requeue(ctx, job_id, str(exc))
        raise
    except Exception as exc:  # noqa: BLE001 - unexpected: fail with the reason, keep the trace in the log
        logger.exception("job %d failed unexpectedly", job_id)
        _fail(ctx, job_id, f"unexpected error: {exc.__class__.__name__}: {exc}")
        return "failed"
    if ctx.worker.storage == "remote":
        # No shared disk with the io workers: deliver from here, straight to
        # the destinations, with the outputs this process just wrote.
        return deliver(ctx, job_id)
    try:
        ctx.dispatcher.enqueue_delivery(job_id)
        with ctx.db.session() as s:
            job = s.get(Job, job_id)
            if job is not None:
                job.enqueued_at = utcnow()
    except Exception as exc:  # noqa: BLE001 - the supervisor re-enqueues (enqueued_at stays NULL)
        logger.warning("job %d: could not enqueue delivery (%s); the node will retry", job_id, exc)
    return "delivering"


def _process_claimed(ctx: WorkerContext, job_id: int) -> None:
    from worker.engine.checkpoint import CheckpointError
    from worker.engine.dicom_io import SeriesError, load_series_headers
    from worker.engine.preprocess import PreprocessError
    from worker.outputs.build import save_output_rows

    timings: dict[str, float] = {}
    with ctx.db.sessionmaker() as s:
        job = s.get(Job, job_id)
        assert job is not None
        study = s.get(Study, job.study_id)
        assert study is not None
        study_uid, series_uid, profile = study.study_instance_uid, job.source_series_uid, job.model_profile
        if job.queued_at is not None and job.started_at is not None:
            timings["queue_wait"] = max(0.0, (job.started_at - job.queued_at).total_seconds())
    _enter_stage(ctx, job_id, "load", timings, reset=True)
    if not series_uid:
        raise PermanentJobError("job has no source series (routing did not choose one)")

    t0 = time.perf_counter()
    try:
        predictor = ctx.predictor(profile)
    except FileNotFoundError as exc:
        raise PermanentJobError(f"model not found: {exc}") from None
    except (ValueError, CheckpointError) as exc:  # bad checkpoint, bad settings, CUDA unavailable
        raise PermanentJobError(f"model cannot be loaded: {exc}") from None
    files = _fetch(ctx, study_uid, series_uid)
    with files, paused_gc():
        try:
            volume, refs, headers = load_series_headers(files.paths)
        except SeriesError as exc:
            raise PermanentJobError(f"source series cannot be read: {exc}") from None
        timings["load"] = time.perf_counter() - t0
        _enter_stage(ctx, job_id, "inference", timings)
        if ctx.worker.pre_inference_delay_seconds:
            time.sleep(ctx.worker.pre_inference_delay_seconds)
        try:
            prediction = predictor.predict(volume)
        except PreprocessError as exc:  # e.g. no brain found, empty foreground
            raise PermanentJobError(f"series cannot be analysed: {exc}") from None
        except CheckpointError as exc:  # e.g. an uncalibrated model
            raise PermanentJobError(f"model cannot be used: {exc}") from None
        timings["inference"] = float(prediction.timings.get("preprocess", 0.0) + prediction.timings.get("inference", 0.0))
        timings["postprocess"] = float(prediction.timings.get("postprocess", 0.0))
        findings = _findings(prediction, predictor)
        domain = _domain(prediction)
        if domain:
            findings["domain"] = domain
        # Kept when building the outputs fails.
        _enter_stage(ctx, job_id, "build", timings, findings=findings, study_score=float(prediction.study_score))
        t1 = time.perf_counter()
        built = _build(ctx, job_id, files.paths, prediction, predictor, refs, headers)
        timings["build"] = time.perf_counter() - t1
    validation = built.validation() if hasattr(built, "validation") else {}
    if validation:
        # what the gate found in the source and repaired or let through (no values: no patient data)
        findings["validation"] = validation
    notes = _validation_note(validation)
    outside = ""
    if domain and not domain.get("in_domain", True):
        warnings = [str(w) for w in domain.get("warnings") or []]
        # The warnings hold numbers and units only (no patient data).
        logger.warning("job %d: series outside the model's training domain: %s",
                       job_id, "; ".join(warnings) or "no detail")
        outside = ", outside the training domain" + (f": {warnings[0][:200]}" if warnings else "")
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        save_output_rows(s, job_id, built, ctx.outputs_dir)
        job.findings = findings
        job.study_score = float(prediction.study_score)
        job.timings = {**(job.timings or {}), **{k: round(v, 4) for k, v in timings.items()}}
        job.error = None
        job.enqueued_at = None
        job.lease_expires_at = None  # the delivery step takes its own lease
        job.stage, job.stage_started_at = "delivery", utcnow()
        transition(s, job, JobState.DELIVERING,
                   f"{len(prediction.findings)} finding(s), {len(built)} output(s) built{notes}{outside}",
                   host=ctx.host)


def _findings(prediction: Any, predictor: Any) -> dict[str, Any]:
    """The prediction's findings as JSON for ``jobs.findings``."""
    return {
        "count": len(prediction.findings),
        "threshold": float(prediction.threshold),
        "model": {"name": predictor.model_name, "version": predictor.model_version, "checksum": predictor.checksum},
        "items": [
            {
                "label": int(f.label),
                "volume_mm3": round(float(f.volume_mm3), 3),
                "centroid": [round(float(c), 3) for c in f.centroid_patient],
                "bbox_zyx": [int(v) for v in f.bbox_zyx],
                "max_score": round(float(f.max_score), 5),
                "mean_score": round(float(f.mean_score), 5),
                "voxel_count": int(f.voxel_count),
            }
            for f in prediction.findings
        ],
    }


def _validation_note(validation: dict[str, Any]) -> str:
    """``", 2 source header value(s) repaired, 1 source error inherited"`` for the job's history, or ``""``."""
    if not validation:
        return ""
    repaired = [f for f in validation.get("fixes", []) if f.get("action") in ("removed", "emptied")]
    inherited = {line for lines in validation.get("inherited", {}).values() for line in lines}
    note = ""
    if repaired:
        note += f", {len(repaired)} source header value(s) repaired"
    if inherited:
        note += f", {len(inherited)} source error(s) inherited"
    return note


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _jsonable(value.tolist())
    return value


def _domain(prediction: Any) -> dict[str, Any]:
    """The prediction's training-domain check as JSON for ``findings["domain"]``.

    Parameters
    ----------
    prediction:
        The engine's prediction; its ``domain`` is empty (or absent) for
        checkpoints without a training-domain record.

    Returns
    -------
    dict
        ``{"in_domain": bool, "warnings": [...], "checks": {...}}``, or ``{}``.
    """
    domain = getattr(prediction, "domain", None)
    if not domain:
        return {}
    out = _jsonable(dict(domain))
    out["in_domain"] = bool(out.get("in_domain", True))
    return dict(out)


def _fetch(ctx: WorkerContext, study_uid: str, series_uid: str) -> SeriesFiles:
    try:
        if ctx.worker.storage == "remote":
            return fetch_series_remote(ctx.worker.node_url, study_uid, series_uid, token=ctx.worker.node_token,
                                       verify=ctx.worker.node_verify())
        return fetch_series_shared(ctx.db, ctx.settings.storage.root, series_uid)
    except FetchError as exc:
        if exc.transient:
            raise TransientJobError(str(exc)) from None
        raise PermanentJobError(str(exc)) from None


def _build(ctx: WorkerContext, job_id: int, paths: list[Path], prediction: Any, predictor: Any,
           order: list[Any], headers: list[Any]) -> Any:
    """Build, validate and write the outputs from the headers the loader read.

    Returns the written outputs (``worker.outputs.build.JobOutputs``).

    Raises
    ------
    PermanentJobError
        An output failed validation, or the source cannot be used.
    """
    from worker.outputs.build import build_job_outputs
    from worker.outputs.source import SourceError
    from worker.outputs.validate import OutputValidationError

    try:
        return build_job_outputs(
            job_id=job_id,
            source_paths=paths,
            prediction=prediction,
            predictor=predictor,
            settings=ctx.settings,
            out_dir=ctx.outputs_dir / str(job_id),
            order=order,
            source_headers=headers,
        )
    except OutputValidationError as exc:
        raise PermanentJobError(f"output failed validation: {exc}") from None
    except SourceError as exc:
        raise PermanentJobError(f"outputs cannot be built from the source series: {exc}") from None


def deliver(ctx: WorkerContext, job_id: int, *, sleep: Any = time.sleep) -> str:
    """Send a job's outputs to every destination (``delivering`` -> ``done``
    or ``delivery_failed``). Returns the resulting state or ``not-claimed``."""
    from worker.deliver.service import deliver_job

    q = ctx.settings.queue
    if not lease.claim(ctx.db, job_id, from_state=JobState.DELIVERING, to_state=JobState.DELIVERING,
                       host=ctx.host, lease_seconds=q.lease_seconds, message=f"delivery started on {ctx.host}"):
        return "not-claimed"
    _enter_stage(ctx, job_id, "delivery", {})
    with _Heartbeat(ctx, job_id, JobState.DELIVERING):
        report = deliver_job(ctx.db, job_id, settings=ctx.settings, outputs_dir=ctx.outputs_dir, sleep=sleep)
    lease.release(ctx.db, job_id)
    return str(report.state)
