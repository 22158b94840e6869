"""Study assembly: turn quiet (or otherwise complete) studies into jobs.

A study version is complete when

* no instance arrived for ``study.stable_seconds``, or
* every ``study.required_series`` pattern matches one of its series and no
  instance arrived for ``study.required_series_quiet_seconds``, or
* ``study.force_complete_seconds`` passed since the version's first instance
  (a sender that never stops trickling still gets analysed).

An optional ``completeness`` gate (e.g. the archive check of
:mod:`pacs_node.pull.completeness`) is consulted before a stable study is
claimed (not for forced completion): it may hold the study back (the next
tick asks again; ``force_complete_seconds`` still applies) or add a note to
the job's reason ("proceeded incomplete: 8 of 10 instances after 120 s").

:meth:`StudyAssembler.tick` claims each complete version with one atomic
``UPDATE ... WHERE job_version < version`` and creates its job in the same
transaction, so two node processes can never create the same job.

Interrupted studies
-------------------
A study whose arrival was cut (A-ABORT, lost connection, node crash; see
:mod:`pacs_node.ingest.arrivals`) carries ``studies.interrupted_at``. Its
quiet time says nothing about completeness then, so none of the rules above
claims it -- not even ``force_complete_seconds``, which exists for senders
that trickle, not for transfers known to be cut (Orthanc's ``StableAge`` and
mercure's quiet-time triggers have no notion of an abort; their users expect
a partial transfer to be sent again, not analysed). It is claimed when

* a later arrival for the study ends normally (the mark is cleared; then the
  usual rules apply, from its last instance), or
* the completeness gate *verifies* it against the source archive
  (``CompletenessResult.verified``) after ``stable_seconds`` of quiet, or
* an operator analyses it (``POST /api/v1/studies/{uid}/analyze``,
  ``pacs-node analyze``).

An association that is still open does not hold its study: a sender that
keeps an association open between studies, or pauses mid-study, is covered
by ``stable_seconds`` and the completeness gate as before, and a cut is
known only once the association ends.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from pacs_node.config import StudySettings
from pacs_node.db.models import Series, Study, utcnow
from pacs_node.db.session import Database
from pacs_node.jobs.actions import create_job
from pacs_node.jobs.routing import RoutingRule

__all__ = ["CompletenessResult", "StudyAssembler"]

logger = logging.getLogger(__name__)

JobCreated = Callable[[int], None]


@dataclass(frozen=True)
class CompletenessResult:
    """Verdict of a completeness gate: claim now (``ready``), with an
    optional ``note`` appended to the job's reason."""

    ready: bool
    note: str | None = None
    #: The study's instances were checked against its source and all are
    #: held: only this releases an interrupted study.
    verified: bool = False


Completeness = Callable[[Study], CompletenessResult]


@dataclass(frozen=True)
class _Candidate:
    study_id: int
    version: int
    last_received_at: dt.datetime
    version_started_at: dt.datetime
    interrupted_at: dt.datetime | None = None
    interrupted_reason: str | None = None


class StudyAssembler:
    """The assemble step. Call :meth:`tick` from a loop (:meth:`run`) or a test.

    Parameters
    ----------
    db:
        The node's database.
    settings:
        The ``[study]`` settings.
    on_job_created:
        Called with each new job id *after* its row is committed (the job
        issue's enqueue step hooks in here).
    clock:
        Returns the current UTC time; tests pass a fake clock.
    rules:
        Routing rules (default: analyse CT and MR studies).
    completeness:
        Optional gate called with the :class:`Study` row before a complete
        (not forced) version is claimed; see the module docstring.
    """

    def __init__(
        self,
        db: Database,
        settings: StudySettings,
        *,
        on_job_created: JobCreated | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        rules: list[RoutingRule] | None = None,
        completeness: Completeness | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.on_job_created = on_job_created
        self.clock = clock
        self.rules = rules or [RoutingRule()]
        self.completeness = completeness
        self._patterns = [re.compile(p, re.IGNORECASE) for p in settings.required_series]
        #: When the earliest study still waiting becomes due (quiet for
        #: ``stable_seconds``, or forced), as of the last :meth:`tick`;
        #: ``None`` when nothing waits. The loops sleep until then at most.
        self.next_due_at: dt.datetime | None = None

    # -- one step -----------------------------------------------------------------
    def tick(self) -> list[int]:
        """Create jobs for every complete study version; return their ids."""
        now = self.clock()
        created: list[int] = []
        next_due: dt.datetime | None = None
        for cand in self._candidates():
            if cand.interrupted_at is not None:
                reason = self._interrupted_reason(cand, now)
                if reason is None:
                    due = cand.last_received_at + dt.timedelta(seconds=self.settings.stable_seconds)
                    if due > now:
                        next_due = due if next_due is None else min(next_due, due)
                    continue
                job_id = self._claim(cand, reason)
                if job_id is not None:
                    created.append(job_id)
                continue
            reason = self._completion_reason(cand, now)
            if reason is None:
                due = self._due_at(cand)
                next_due = due if next_due is None else min(next_due, due)
                continue
            if self.completeness is not None and not reason.startswith("forced"):
                verdict = self._check_completeness(cand)
                if verdict is None:
                    continue
                if not verdict.ready:
                    force = self.settings.force_complete_seconds
                    if (now - cand.version_started_at).total_seconds() < force:
                        continue
                    reason = f"forced complete after {force:g} s (completeness check still waiting)"
                elif verdict.note:
                    reason = f"{reason}; {verdict.note}"
            job_id = self._claim(cand, reason)
            if job_id is not None:
                created.append(job_id)
        self.next_due_at = next_due
        for job_id in created:
            if self.on_job_created is not None:
                try:
                    self.on_job_created(job_id)
                except Exception:  # noqa: BLE001 - the job row stays queued; logged
                    logger.exception("job %d: post-create hook failed", job_id)
        return created

    def _candidates(self) -> list[_Candidate]:
        with self.db.sessionmaker() as s:
            rows = s.execute(
                select(Study.id, Study.version, Study.last_received_at, Study.version_started_at,
                       Study.interrupted_at, Study.interrupted_reason)
                .where(Study.job_version < Study.version)
                .order_by(Study.last_received_at)
            ).all()
        return [_Candidate(*row) for row in rows]

    def _completion_reason(self, cand: _Candidate, now: dt.datetime) -> str | None:
        quiet = (now - cand.last_received_at).total_seconds()
        if quiet >= self.settings.stable_seconds:
            return f"study stable for {self.settings.stable_seconds:g} s"
        if (now - cand.version_started_at).total_seconds() >= self.settings.force_complete_seconds:
            return f"forced complete after {self.settings.force_complete_seconds:g} s"
        if self._patterns and quiet >= self.settings.required_series_quiet_seconds:
            with self.db.sessionmaker() as s:
                labels = s.execute(
                    select(Series.series_description, Series.modality).where(Series.study_id == cand.study_id)
                ).all()
            texts = [" ".join(x for x in row if x) for row in labels]
            if all(any(p.search(t) for t in texts) for p in self._patterns):
                return "required series present"
        return None

    def _interrupted_reason(self, cand: _Candidate, now: dt.datetime) -> str | None:
        """Claim reason for an interrupted study: only a verified completeness
        check after ``stable_seconds`` of quiet (see the module docstring)."""
        if self.completeness is None:
            return None
        if (now - cand.last_received_at).total_seconds() < self.settings.stable_seconds:
            return None
        verdict = self._check_completeness(cand)
        if verdict is None or not (verdict.ready and verdict.verified):
            return None
        return f"interrupted arrival ({cand.interrupted_reason}); {verdict.note or 'verified complete'}"

    def _due_at(self, cand: _Candidate) -> dt.datetime:
        """When a waiting candidate becomes stable or forced, if nothing else arrives."""
        return min(
            cand.last_received_at + dt.timedelta(seconds=self.settings.stable_seconds),
            cand.version_started_at + dt.timedelta(seconds=self.settings.force_complete_seconds),
        )

    def wait_seconds(self) -> float:
        """How long a loop should sleep before the next :meth:`tick`.

        ``scheduler_interval_seconds``, or less when a waiting study becomes
        due sooner (so a study is claimed about ``stable_seconds`` after its
        last instance instead of up to one interval later); at least 10 ms.
        """
        interval = self.settings.scheduler_interval_seconds
        if self.next_due_at is None:
            return interval
        until = (self.next_due_at - self.clock()).total_seconds()
        return max(0.01, min(interval, until))

    def _check_completeness(self, cand: _Candidate) -> CompletenessResult | None:
        assert self.completeness is not None
        try:
            with self.db.sessionmaker() as s:
                study = s.get(Study, cand.study_id)
                if study is None:
                    return None
                s.expunge(study)
            # Outside the session: on SQLite it holds the write lock.
            return self.completeness(study)
        except Exception:  # noqa: BLE001 - a broken gate must not stop analyses
            logger.exception("study %d: completeness check failed; proceeding", cand.study_id)
            return CompletenessResult(True, "completeness check failed")

    def _claim(self, cand: _Candidate, reason: str) -> int | None:
        try:
            with self.db.session() as s:
                claimed = s.execute(  # type: ignore[attr-defined]
                    update(Study)
                    .where(
                        Study.id == cand.study_id,
                        Study.version == cand.version,
                        Study.job_version < cand.version,
                        # Nothing arrived since we looked, unless forced.
                        Study.last_received_at == cand.last_received_at,
                        # Not interrupted since we looked (nor cleared).
                        Study.interrupted_at.is_(None) if cand.interrupted_at is None
                        else Study.interrupted_at == cand.interrupted_at,
                    )
                    .values(job_version=cand.version)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if claimed != 1:
                    return None
                study = s.get(Study, cand.study_id)
                assert study is not None
                job = create_job(s, study, cand.version, reason, self.rules)
                job_id = job.id
        except IntegrityError:
            # Another process created this version's job first.
            logger.info("study %d version %d already has a job", cand.study_id, cand.version)
            return None
        logger.info(
            "job %d created for study %d version %d: %s", job_id, cand.study_id, cand.version, reason
        )
        return job_id

    # -- loop ---------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Call :meth:`tick` every ``scheduler_interval_seconds`` (sooner when a
        study becomes due, :meth:`wait_seconds`) until ``stop`` is set."""
        logger.info("study assembler running (stable after %g s)", self.settings.stable_seconds)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep the loop alive; the database may come back
                logger.exception("assembler tick failed")
            stop.wait(self.wait_seconds())
