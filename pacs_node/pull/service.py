"""Pull a study from a configured source, then analyse it.

:meth:`PullService.pull_and_analyze` is what ``POST
/api/v1/studies/{uid}/analyze`` with ``{"source": NAME}`` and ``pacs-node
analyze UID --source NAME`` run:

1. ask the source for the study (QIDO-RS / C-FIND STUDY level) -- a study the
   source does not hold raises :class:`StudyNotOnSourceError` (API 404);
2. retrieve it (WADO-RS, C-GET or C-MOVE; see :mod:`pacs_node.pull.dicomweb`
   and :mod:`pacs_node.pull.dimse`); every instance is stored by the node's
   ingestor under the usual durability rule (``instances.source = 'pull'``;
   C-MOVEd instances arrive at the node's SCP as ``dimse``);
3. create the job with :func:`pacs_node.jobs.actions.analyze_study` (the pending
   version, or a re-analysis when the node already held every instance) and
   enqueue it.

While a study is being pulled by a service, :meth:`PullService.is_pulling` is
true and the node's assembler leaves it alone, so the pull's own job is the
only one; a pull started while another pull of the same study runs raises
:class:`PullBusyError` (API 409).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import func, select

from pacs_node.db.models import Instance, Job, Study
from pacs_node.ingest.uids import InvalidUIDError, check_uid
from pacs_node.jobs.actions import analyze_study
from pacs_node.jobs.routing import RoutingRule
from pacs_node.node import Node
from pacs_node.pull import dicomweb, dimse
from pacs_node.pull.base import (
    PullBusyError,
    PullError,
    PullReport,
    SourceError,
    SourceListing,
    StudyNotOnSourceError,
    ingest_pulled,
)
from pacs_node.pull.settings import SourceSettings, find_source, load_sources
from pacs_node.queue import Dispatcher

__all__ = ["BadPullRequestError", "PullService", "list_source_instances"]

logger = logging.getLogger(__name__)


class BadPullRequestError(PullError):
    """Unknown source name or malformed Study Instance UID."""

    http_status = 400


def list_source_instances(src: SourceSettings, study_uid: str) -> SourceListing:
    """Which instances ``src`` holds for the study: the SOP Instance UIDs
    (QIDO-RS ``/instances`` or C-FIND IMAGE level) or, when the source cannot
    list them, the study's NumberOfStudyRelatedInstances.

    Raises
    ------
    StudyNotOnSourceError, SourceUnavailableError, SourceError
    """
    client = dicomweb if src.kind == "dicomweb" else dimse
    try:
        return client.list_instances(src, study_uid)
    except (StudyNotOnSourceError, SourceError) as exc:
        logger.info("source %s: cannot list instances (%s); asking for the count", src.name, exc)
        return client.query_study(src, study_uid)


class PullService:
    """Pulls studies from the ``[[sources]]`` of the node's configuration.

    Parameters
    ----------
    node:
        The node (settings, database, ingestor).
    sources:
        Validated sources; default: ``node.settings.sources``.

    Raises
    ------
    ValueError
        When ``[[sources]]`` is invalid (one line naming the key).
    """

    def __init__(self, node: Node, sources: list[SourceSettings] | None = None) -> None:
        self.node = node
        self.sources = sources if sources is not None else load_sources(
            node.settings.sources, node.settings.dicom.ae_title)
        self._active: set[str] = set()
        self._lock = threading.Lock()

    # -- registry -------------------------------------------------------------------
    def is_pulling(self, study_uid: str) -> bool:
        """True while this service pulls (or creates the job of) the study."""
        with self._lock:
            return study_uid in self._active

    @contextmanager
    def _claim(self, study_uid: str) -> Iterator[None]:
        with self._lock:
            if study_uid in self._active:
                raise PullBusyError(f"study {study_uid} is being pulled already")
            self._active.add(study_uid)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(study_uid)

    def source(self, name: str) -> SourceSettings:
        src = find_source(self.sources, name)
        if src is None:
            raise BadPullRequestError(f"unknown source {name!r}")
        return src

    # -- pull -------------------------------------------------------------------------
    def pull(self, source_name: str, study_uid: str) -> PullReport:
        """Retrieve the study from the source into the node (no job).

        Raises
        ------
        BadPullRequestError, StudyNotOnSourceError, SourceUnavailableError,
        SourceError, PullBusyError
        """
        src = self.source(source_name)
        study_uid = self._check_uid(study_uid)
        with self._claim(study_uid):
            return self._pull(src, study_uid)

    def pull_and_analyze(self, dispatcher: Dispatcher, source_name: str, study_uid: str,
                         rules: list[RoutingRule]) -> tuple[PullReport, int]:
        """Retrieve the study, then create and enqueue its job.

        Returns
        -------
        (PullReport, int)
            What was retrieved, and the job id.

        Raises
        ------
        BadPullRequestError, StudyNotOnSourceError, SourceUnavailableError,
        SourceError, PullBusyError
        """
        src = self.source(source_name)
        study_uid = self._check_uid(study_uid)
        with self._claim(study_uid):
            before = self._last_job_id(study_uid)
            report = self._pull(src, study_uid)
            job_id = self._job_after_pull(dispatcher, study_uid, rules, before)
        logger.info("study %s: %s; job %d", study_uid, report.summary(), job_id)
        return report, job_id

    @staticmethod
    def _check_uid(study_uid: str) -> str:
        try:
            return check_uid(study_uid, "StudyInstanceUID")
        except InvalidUIDError as exc:
            raise BadPullRequestError(str(exc)) from None

    def _pull(self, src: SourceSettings, study_uid: str) -> PullReport:
        started = time.monotonic()
        method = "WADO-RS" if src.kind == "dicomweb" else src.retrieve.upper()
        report = PullReport(source=src.name, study_uid=study_uid, method=method)
        logger.info("pulling study %s from %s", study_uid, src.describe())
        # The pull is one arrival: released when the retrieval ended normally,
        # aborted when it failed midway (C-MOVEd instances arrive on the
        # source's own association to the SCP, an arrival of its own).
        arrivals = self.node.ingestor.arrivals
        arrival, outcome = arrivals.new_key("pull"), "aborted"
        try:
            if src.kind == "dicomweb":
                report.expected = dicomweb.query_study(src, study_uid).count
                sink = ingest_pulled(self.node.ingestor, report, study_uid, calling_aet=None, arrival=arrival)
                dicomweb.retrieve_study(src, study_uid, sink)
            elif src.retrieve == "c-get":
                self._c_get(src, study_uid, report, arrival)
            else:
                self._c_move(src, study_uid, report)
            outcome = "released"
        finally:
            report.seconds = time.monotonic() - started
            arrivals.close(arrival, outcome)
        if report.stored + report.duplicates == 0:
            detail = f": {report.errors[0]}" if report.errors else ""
            raise SourceError(f"source {src.name}: no instance of study {study_uid} could be stored "
                              f"({report.failed} failed){detail}")
        if report.failed:
            logger.warning("study %s: %d instance(s) from %s were not stored: %s", study_uid, report.failed,
                           src.name, "; ".join(report.errors[:3]))
        logger.info("study %s: %s", study_uid, report.summary())
        return report

    def _c_get(self, src: SourceSettings, study_uid: str, report: PullReport, arrival: str | None = None) -> None:
        report.expected = dimse.query_study(src, study_uid).count
        classes: set[str] | None = None
        try:
            listing = dimse.list_instances(src, study_uid)
            classes = {c for c in (listing.instances or {}).values() if c} or None
            if report.expected is None:
                report.expected = listing.count
        except (StudyNotOnSourceError, SourceError) as exc:
            logger.info("source %s: no IMAGE-level C-FIND (%s); proposing the common storage classes",
                        src.name, exc)
        sink = ingest_pulled(self.node.ingestor, report, study_uid, calling_aet=src.ae_title, arrival=arrival)
        outcome = dimse.get_study(src, study_uid, sink, classes)
        if outcome.status not in (0x0000, 0xB000):
            if report.received == 0:
                raise SourceError(f"source {src.name}: C-GET failed with status 0x{outcome.status:04X}"
                                  + (f" ({outcome.error_comment})" if outcome.error_comment else ""))
            report.errors.append(f"C-GET final status 0x{outcome.status:04X}")
        if outcome.failed:
            report.errors.append(f"{outcome.failed} C-GET sub-operation(s) failed")

    def _c_move(self, src: SourceSettings, study_uid: str, report: PullReport) -> None:
        report.expected = dimse.query_study(src, study_uid).count
        destination = src.move_destination or self.node.settings.dicom.ae_title
        held_before = self._instance_count(study_uid)
        outcome = dimse.move_study(src, study_uid, destination)
        report.received = outcome.completed + outcome.warning
        report.failed = outcome.failed
        report.stored = max(0, self._instance_count(study_uid) - held_before)
        report.duplicates = max(0, report.received - report.stored)
        if outcome.status == 0xA801:
            raise SourceError(f"source {src.name} does not know the move destination {destination!r}: "
                              "declare the node (AE title, host, port) on the source")
        if outcome.status not in (0x0000, 0xB000) or (outcome.failed and not report.received):
            raise SourceError(
                f"source {src.name} could not send study {study_uid} to {destination} "
                f"(C-MOVE status 0x{outcome.status:04X}, {outcome.failed} failed"
                + (f", {outcome.error_comment}" if outcome.error_comment else "")
                + f"): check that the source knows the move destination {destination!r} (AE title, host, port) "
                "and that the node's DICOM SCP is running and reachable from it")
        if outcome.failed:
            report.errors.append(f"{outcome.failed} C-MOVE sub-operation(s) failed")

    # -- job ----------------------------------------------------------------------------
    def _instance_count(self, study_uid: str) -> int:
        with self.node.db.read_connection() as c:
            return int(c.execute(
                select(func.count(Instance.id)).join(Study, Study.id == Instance.study_id)
                .where(Study.study_instance_uid == study_uid)).scalar_one())

    def _last_job_id(self, study_uid: str) -> int:
        with self.node.db.read_connection() as c:
            return int(c.execute(
                select(func.coalesce(func.max(Job.id), 0)).join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == study_uid)).scalar_one())

    def _job_after_pull(self, dispatcher: Dispatcher, study_uid: str, rules: list[RoutingRule],
                        before: int) -> int:
        """The job for what was pulled: a job another node process (or a CLI
        pull's assembler) created meanwhile for the current version, else a new one."""
        with self.node.db.read_connection() as c:
            row = c.execute(
                select(Job.id).join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == study_uid, Job.id > before,
                       Job.study_version == Study.version, Study.job_version >= Study.version)
                .order_by(Job.id.desc())
            ).first()
        if row is not None:
            # Its creator enqueued it (or the supervisor will).
            logger.info("study %s: job %d was created for it during the pull; using it", study_uid, row[0])
            return int(row[0])
        return analyze_study(self.node.db, dispatcher, study_uid, rules)
