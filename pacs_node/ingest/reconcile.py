"""Storage reconciliation: make the storage root and the ``instances`` table agree.

Run at start-up (:class:`StartupReconciler`, before the DICOM SCP accepts
anything) and by ``pacs-node storage reconcile``:

* ``.incoming-*.tmp`` files (an atomic write cut by a crash,
  :mod:`pacs_node.ingest.storage`) are deleted;
* files with no ``instances`` row (written, then the node died or the
  database refused the row) are moved to
  ``<storage root>/.quarantine/<UTC time>/<relative path>`` with a
  ``MANIFEST.json`` -- on the same file system, so the move is a rename, and
  never scanned again; an operator may put them back or delete them;
* rows whose file is missing are reported (counted, first ids listed), never
  deleted: the study keeps its history, WADO-RS answers 404 for them;
* files that do not follow the storage layout (``<uid>/<uid>/<uid>.dcm``) are
  counted and left alone: the node did not write them.

Files modified less than ``storage.reconcile_grace_seconds`` ago are left for
a later run: another process (a ``pacs-node analyze --source`` pull) may be
writing them. More row-less files than ``storage.quarantine_limit`` means the
database and the storage root do not belong together (a wrong
``database.url``): nothing is moved, the node logs an ERROR and ``/healthz``
reports it; ``--force`` moves them anyway.

Cost: one directory walk (``os.scandir``) into a set of relative paths, then
the ``path`` column streamed in chunks and looked up in that set
(``benchmarks/bench_reconcile.py`` measures it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, func, select

from pacs_node.db.models import Instance, Study, utcnow
from pacs_node.db.session import Database
from pacs_node.ingest.storage import InstanceStore
from pacs_node.ingest.uids import is_valid_uid

if TYPE_CHECKING:
    from pacs_node.node import Node

__all__ = ["QUARANTINE_DIR", "ReconcileReport", "StartupReconciler", "reconcile_check", "reconcile_storage"]

logger = logging.getLogger(__name__)

#: Directory under the storage root that receives quarantined files.
QUARANTINE_DIR = ".quarantine"
_TMP_PREFIX, _TMP_SUFFIX = ".incoming-", ".tmp"
_CHUNK = 10_000
_RECHECK_CHUNK = 500
_EXAMPLES = 20

_I = cast(Table, Instance.__table__)


@dataclass
class ReconcileReport:
    """What one reconciliation found and did (counts only: no patient data)."""

    started_at: dt.datetime
    dry_run: bool = False
    seconds: float = 0.0
    #: Files seen under the storage root (temporary files excluded).
    files: int = 0
    #: ``instances`` rows checked.
    rows: int = 0
    tmp_deleted: int = 0
    #: Row-less files found; ``quarantined`` of them were moved.
    rowless: int = 0
    quarantined: int = 0
    #: Rows whose file is missing (``missing_ids``: the first instance ids).
    missing: int = 0
    missing_ids: list[int] = field(default_factory=list)
    #: Files that do not follow the storage layout (left alone).
    foreign: int = 0
    #: Files younger than the grace period (left for a later run).
    recent: int = 0
    #: Directories or files that could not be read, moved or deleted.
    errors: int = 0
    #: More row-less files than ``storage.quarantine_limit``: nothing was moved.
    refused: bool = False
    quarantine_dir: str | None = None

    @property
    def anomalies(self) -> bool:
        return bool(self.tmp_deleted or self.rowless or self.missing or self.foreign or self.errors)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["seconds"] = round(self.seconds, 3)
        return d

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        moved = (f"{self.rowless} row-less file(s) found, {self.quarantined} quarantined"
                 + (f" in {self.quarantine_dir}" if self.quarantined else ""))
        return (f"{self.files} file(s), {self.rows} row(s) in {self.seconds:.2f} s: {verb} {self.tmp_deleted} "
                f"temporary file(s); {moved}; {self.missing} row(s) without a file; {self.foreign} foreign "
                f"file(s) left alone; {self.recent} too recent to touch; {self.errors} error(s)")


def _walk(root: Path, report: ReconcileReport) -> tuple[set[str], list[str]]:
    """(relative paths of the files under ``root``, absolute paths of temporary files)."""
    present: set[str] = set()
    tmp: list[str] = []
    stack: list[tuple[str, str]] = [("", str(root))]
    while stack:
        rel, path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError as exc:
            report.errors += 1
            logger.warning("storage reconcile: cannot read a directory (%s)", exc.strerror or exc.__class__.__name__)
            continue
        with it:
            for entry in it:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not rel and name.startswith("."):
                            continue  # .quarantine (and other node-private directories)
                        stack.append((f"{rel}/{name}" if rel else name, entry.path))
                    elif name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                        tmp.append(entry.path)
                    else:
                        present.add(f"{rel}/{name}" if rel else name)
                except OSError:
                    report.errors += 1
    report.files = len(present)
    return present, tmp


def _in_layout(rel: str) -> bool:
    parts = rel.split("/")
    return (len(parts) == 3 and parts[2].endswith(".dcm")
            and is_valid_uid(parts[0]) and is_valid_uid(parts[1]) and is_valid_uid(parts[2][:-4]))


def _age(path: str, now: float) -> float | None:
    try:
        return now - os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None


def reconcile_storage(
    db: Database,
    store: InstanceStore,
    *,
    grace_seconds: float = 60.0,
    quarantine_limit: int = 1000,
    dry_run: bool = False,
    force: bool = False,
) -> ReconcileReport:
    """Reconcile the storage root with the ``instances`` table (see the module docstring).

    Parameters
    ----------
    db, store:
        The node's database and instance store.
    grace_seconds:
        Files modified more recently are left alone.
    quarantine_limit:
        At most this many row-less files are moved (unless ``force``).
    dry_run:
        Count only; delete and move nothing.
    force:
        Quarantine row-less files even beyond ``quarantine_limit``.

    Returns
    -------
    ReconcileReport
        The counts; also logged (WARNING when anything was found).

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError
        When the database cannot be read.
    """
    started, t0 = utcnow(), time.monotonic()
    report = ReconcileReport(started_at=started, dry_run=dry_run)
    root = store.root
    present, tmp = _walk(root, report)
    wall_now = time.time()

    # Rows against the walk: a row written after the walk began may have a
    # file the walk did not see yet, so only older rows count as missing.
    with db.read_connection() as conn:
        result = conn.execution_options(yield_per=_CHUNK).execute(select(_I.c.id, _I.c.path, _I.c.received_at))
        for iid, path, received_at in result:
            report.rows += 1
            if path in present:
                present.discard(path)
            elif received_at < started:
                report.missing += 1
                if len(report.missing_ids) < _EXAMPLES:
                    report.missing_ids.append(int(iid))

    rowless: list[str] = []
    for rel in present:
        if not _in_layout(rel):
            report.foreign += 1
            continue
        age = _age(str(root / rel), wall_now)
        if age is None:
            continue  # gone since the walk
        if age < grace_seconds:
            report.recent += 1
        else:
            rowless.append(rel)
    rowless = _without_rows(db, rowless)
    report.rowless = len(rowless)

    for path in tmp:
        age = _age(path, wall_now)
        if age is None:
            continue
        if age < grace_seconds:
            report.recent += 1
            continue
        report.tmp_deleted += 1
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                report.errors += 1

    if rowless and len(rowless) > quarantine_limit and not force:
        report.refused = True
    elif rowless and not dry_run:
        _quarantine(root, sorted(rowless), started, report)

    report.seconds = time.monotonic() - t0
    if report.refused:
        logger.error(
            "storage reconcile: %d files under the storage root have no row (more than storage.quarantine_limit "
            "= %d): the database and the storage root may not belong together; nothing was moved "
            "(`pacs-node storage reconcile --force` quarantines them)", report.rowless, quarantine_limit,
        )
    if report.anomalies:
        logger.warning("storage reconcile%s: %s", " (dry run)" if dry_run else "", report.summary())
    else:
        logger.info("storage reconcile%s: %s", " (dry run)" if dry_run else "", report.summary())
    return report


def _without_rows(db: Database, candidates: list[str]) -> list[str]:
    """Drop candidates whose row was committed since the rows were streamed."""
    if not candidates:
        return []
    found: set[str] = set()
    with db.read_connection() as conn:
        for i in range(0, len(candidates), _RECHECK_CHUNK):
            chunk = candidates[i:i + _RECHECK_CHUNK]
            found.update(conn.execute(select(_I.c.path).where(_I.c.path.in_(chunk))).scalars())
    return [c for c in candidates if c not in found]


def _quarantine(root: Path, rowless: list[str], started: dt.datetime, report: ReconcileReport) -> None:
    target = root / QUARANTINE_DIR / started.strftime("%Y%m%dT%H%M%S.%fZ")
    moved: list[dict[str, Any]] = []
    for rel in rowless:
        src, dst = root / rel, target / rel
        try:
            size = src.stat().st_size
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.errors += 1
            logger.warning("storage reconcile: cannot quarantine a file (%s)", exc.strerror or exc.__class__.__name__)
            continue
        moved.append({"path": rel, "size_bytes": size})
        for parent in (src.parent, src.parent.parent):  # empty series / study directories
            try:
                parent.rmdir()
            except OSError:
                break
    report.quarantined = len(moved)
    if moved:
        report.quarantine_dir = str(target)
        manifest = {"created_at": started.isoformat(), "reason": "no instances row", "files": moved}
        (target / "MANIFEST.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def reconcile_check(node: Node) -> dict[str, Any]:
    """The ``reconcile`` entry of ``/healthz``: the last reconciliation's
    counts and the number of interrupted studies. ``ok`` is false only when
    quarantining was refused (database and storage root do not match).

    Parameters
    ----------
    node:
        The node (``node.reconcile`` is set by :class:`StartupReconciler`).

    Returns
    -------
    dict
        ``ok``, ``last`` (the report or None), ``interrupted_studies``.
    """
    report: ReconcileReport | None = getattr(node, "reconcile", None)
    out: dict[str, Any] = {"ok": not (report is not None and report.refused),
                           "last": report.as_dict() if report is not None else None}
    try:
        with node.db.read_connection() as conn:
            out["interrupted_studies"] = int(conn.execute(
                select(func.count()).select_from(Study).where(Study.interrupted_at.is_not(None))).scalar_one())
    except Exception as exc:  # noqa: BLE001 - the database check reports the outage
        out["interrupted_studies"] = None
        out["error"] = exc.__class__.__name__
    return out


class StartupReconciler:
    """Start-up reconciliation of a node: close the arrivals its previous
    process left open, then reconcile the storage root; files that were too
    recent are looked at again once the grace period has passed.

    Parameters
    ----------
    node:
        The node; the storage report is kept in ``node.reconcile``.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self._timer: threading.Timer | None = None
        self._stopped = False

    def run(self) -> ReconcileReport | None:
        """Reconcile now (blocking).

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            When the database cannot be read or written.
        """
        self.node.ingestor.arrivals.recover()
        if not self.node.settings.storage.reconcile_on_start:
            return None
        return self._storage(again=True)

    def _storage(self, *, again: bool) -> ReconcileReport:
        s = self.node.settings.storage
        report = reconcile_storage(self.node.db, self.node.store, grace_seconds=s.reconcile_grace_seconds,
                                   quarantine_limit=s.quarantine_limit)
        self.node.reconcile = report
        if again and report.recent and not self._stopped:
            # Once: on a node that receives, some files are always recent.
            self._timer = threading.Timer(s.reconcile_grace_seconds + 1.0, self._again)
            self._timer.daemon = True
            self._timer.start()
        return report

    def _again(self) -> None:
        if self._stopped:
            return
        try:
            self._storage(again=False)
        except Exception:  # noqa: BLE001 - a later start or the CLI tries again
            logger.exception("storage reconcile (second pass) failed")

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
