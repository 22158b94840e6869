"""Completeness verified against the archive.

A PACS that pushes a study may pause longer than ``study.stable_seconds`` in
the middle of it (a busy archive, a slow link): the node would analyse half a
study. When the study's sender is one of a source's ``calling_aets`` and that
source has ``verify_completeness = true``, the :class:`CompletenessChecker`
(the assembler's completeness gate) asks the source which instances the study
has -- QIDO-RS ``/studies/{uid}/instances`` or C-FIND IMAGE level, else
NumberOfStudyRelatedInstances -- and holds the study back until the node
holds them all, at most ``completeness_timeout_seconds`` after the study
turned stable. The node's own outputs (SOP Instance UIDs in ``outputs``, e.g.
the SEG/SR of a previous run that the archive now holds) are not expected.

Then the job is created; its reason (``jobs.reason`` and the creation event)
says what was found:

* ``verified complete against source orthanc (10 instances)``;
* ``proceeded incomplete: 8 of 10 instances after 120 s``;
* ``completeness not verified: source orthanc unreachable (...) after 120 s``;
* ``completeness not verified: study ... not found on source orthanc``.

An interrupted study (its arrival was cut; see
:mod:`pacs_node.ingest.arrivals`) is held until the source confirms that the
node holds every instance (``CompletenessResult.verified``): for it the
timeout does not proceed unverified, and a source that does not know the
study does not release it.

The source is queried in a background thread (the assembler's loop never
blocks on a slow archive) and at most every ``completeness_poll_seconds`` per
study.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from pacs_node.assemble.scheduler import CompletenessResult
from pacs_node.db.models import Instance, Job, Output, Study, utcnow
from pacs_node.db.session import Database
from pacs_node.pull.base import PullError, SourceListing, StudyNotOnSourceError
from pacs_node.pull.settings import SourceSettings

__all__ = ["CompletenessChecker", "CompletenessResult"]

logger = logging.getLogger(__name__)

Lister = Callable[[SourceSettings, str], SourceListing]

#: How long the first query may hold the assembler's tick, in seconds.
FIRST_ANSWER_WAIT = 0.5


@dataclass
class _Entry:
    source: str
    future: cf.Future[SourceListing] | None = None
    listing: SourceListing | None = None
    error: PullError | None = None
    queried_at: float = float("-inf")
    used_at: float = field(default_factory=time.monotonic)
    announced: bool = False


class CompletenessChecker:
    """The assembler's completeness gate for studies pushed by a source.

    Parameters
    ----------
    db:
        The node's database.
    sources:
        Validated ``[[sources]]``; only those with ``verify_completeness`` matter.
    stable_seconds:
        ``study.stable_seconds`` (the wait is measured from the moment the
        study turned stable).
    lister:
        Asks a source for a study's instances (tests inject a fake).
    clock:
        Current UTC time.
    """

    def __init__(self, db: Database, sources: list[SourceSettings], stable_seconds: float, *,
                 lister: Lister | None = None, clock: Callable[[], dt.datetime] = utcnow) -> None:
        from pacs_node.pull.service import list_source_instances

        self.db = db
        self.sources = [s for s in sources if s.verify_completeness and s.calling_aets]
        self.stable_seconds = stable_seconds
        self.lister: Lister = lister or list_source_instances
        self.clock = clock
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None

    @property
    def active(self) -> bool:
        """Whether any source asks for verification."""
        return bool(self.sources)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- the gate -------------------------------------------------------------------
    def __call__(self, study: Study) -> CompletenessResult:
        src = self._source_for(study)
        if src is None:
            return CompletenessResult(True)
        key = (study.id, study.version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.source != src.name:
                entry = self._entries[key] = _Entry(src.name)
            entry.used_at = time.monotonic()
            self._prune()
        self._refresh(entry, src, study.study_instance_uid)
        verdict = self._evaluate(entry, src, study)
        if verdict.ready:
            with self._lock:
                self._entries.pop(key, None)
        return verdict

    def _source_for(self, study: Study) -> SourceSettings | None:
        if not self.sources:
            return None
        with self.db.read_connection() as c:
            aets = {a for (a,) in c.execute(
                select(Instance.calling_aet).where(Instance.study_id == study.id,
                                                   Instance.study_version == study.version).distinct()) if a}
        if study.calling_aet:
            aets.add(study.calling_aet)
        for src in self.sources:
            if aets & set(src.calling_aets):
                return src
        return None

    def _refresh(self, entry: _Entry, src: SourceSettings, study_uid: str) -> None:
        """Collect a finished query; start one when due (at most every poll interval)."""
        self._collect(entry, src)
        if entry.future is None and time.monotonic() - entry.queried_at >= src.completeness_poll_seconds:
            first = entry.listing is None and entry.error is None
            entry.queried_at = time.monotonic()
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="completeness")
            entry.future = self._pool.submit(self.lister, src, study_uid)
            if first:
                # A quick archive answers within this tick: no extra tick of delay.
                cf.wait([entry.future], timeout=FIRST_ANSWER_WAIT)
                self._collect(entry, src)

    @staticmethod
    def _collect(entry: _Entry, src: SourceSettings) -> None:
        fut = entry.future
        if fut is None or not fut.done():
            return
        entry.future = None
        try:
            entry.listing, entry.error = fut.result(), None
        except PullError as exc:
            entry.error = exc
        except Exception as exc:  # noqa: BLE001 - recorded as "not verified"
            logger.error("completeness query to %s failed: %s", src.name, exc, exc_info=exc)
            entry.error = PullError(f"{exc.__class__.__name__}: {exc}")

    def _held(self, study: Study) -> tuple[set[str], set[str]]:
        """(the study's instances on the node, the node's outputs for the study)."""
        with self.db.read_connection() as c:
            held = set(c.execute(select(Instance.sop_instance_uid).where(Instance.study_id == study.id)).scalars())
            outputs = set(c.execute(
                select(Output.sop_instance_uid).join(Job, Job.id == Output.job_id)
                .where(Job.study_id == study.id)).scalars())
        return held - outputs, outputs

    def _evaluate(self, entry: _Entry, src: SourceSettings, study: Study) -> CompletenessResult:
        stable_at = study.last_received_at + dt.timedelta(seconds=self.stable_seconds)
        waited = max(0.0, (self.clock() - stable_at).total_seconds())
        # A cut study is released only by a verified answer (no time-out).
        interrupted = study.interrupted_at is not None
        timed_out = waited >= src.completeness_timeout_seconds and not interrupted
        after = f"after {src.completeness_timeout_seconds:g} s"
        uid = study.study_instance_uid

        if isinstance(entry.error, StudyNotOnSourceError) and not interrupted:
            logger.warning("study %s: not found on source %s; completeness not verified", uid, src.name)
            return CompletenessResult(True, f"completeness not verified: study not found on source {src.name}")
        if entry.listing is None:
            if timed_out:
                why = str(entry.error) if entry.error is not None else f"source {src.name} did not answer"
                logger.warning("study %s: %s; proceeding unverified", uid, why)
                return CompletenessResult(True, f"completeness not verified: {why} {after}")
            return CompletenessResult(False)

        held, outputs = self._held(study)
        listing = entry.listing
        if listing.instances is not None:
            expected = set(listing.instances) - outputs
            have, total = len(expected & held), len(expected)
        else:
            total = max(0, (listing.count or 0) - len(outputs))
            have = min(len(held), total)
        if have >= total:
            logger.info("study %s: verified complete against source %s (%d instances)", uid, src.name, total)
            return CompletenessResult(True, f"verified complete against source {src.name} ({total} instances)",
                                      verified=True)
        if timed_out:
            logger.warning("study %s: proceeded incomplete: %d of %d instances %s (source %s)",
                           uid, have, total, after, src.name)
            return CompletenessResult(True, f"proceeded incomplete: {have} of {total} instances {after}")
        if not entry.announced:
            entry.announced = True
            if interrupted:
                logger.info("study %s: interrupted arrival; held until %d more instance(s) arrive (%d of %d "
                            "held; source %s)", uid, total - have, have, total, src.name)
            else:
                logger.info("study %s: waiting up to %g s for %d more instance(s) (%d of %d held; source %s)",
                            uid, src.completeness_timeout_seconds, total - have, have, total, src.name)
        return CompletenessResult(False)

    def _prune(self) -> None:
        """Forget studies not asked about for an hour (claimed elsewhere, deleted)."""
        now = time.monotonic()
        for key in [k for k, e in self._entries.items() if now - e.used_at > 3600]:
            self._entries.pop(key, None)
