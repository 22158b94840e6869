"""Start-up storage reconciliation against real storage and real SQLite /
PostgreSQL: leftover temporary files, files without a row, rows without a
file, the quarantine limit, the start of a NodeServer (before the SCP
accepts), ``/healthz`` and ``pacs-node storage reconcile``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from dicom_factory import make_study, to_bytes
from nodetest import TEST_AUTH, make_settings
from pacs_node.config import Settings
from pacs_node.db.models import Instance
from pacs_node.ingest.reconcile import QUARANTINE_DIR, reconcile_check, reconcile_storage
from pacs_node.ingest.recorder import parse_meta
from pacs_node.node import Node

OLD = time.time() - 3600  # an hour ago: older than any grace period used here


def _ingest(node: Node, n: int = 3) -> list[str]:
    """Store a study of ``n`` instances; their relative paths."""
    paths = []
    for ds in make_study(1, n):
        data = to_bytes(ds)
        paths.append(node.ingestor.ingest(data, parse_meta(data), source="dimse", calling_aet="TEST").relpath)
    return paths


def _age(path: Path, mtime: float = OLD) -> Path:
    os.utime(path, (mtime, mtime))
    return path


def _rows(node: Node) -> int:
    with node.db.read_connection() as c:
        return int(c.execute(select(func.count()).select_from(Instance)).scalar_one())


def _rowless(node: Node, name: str = "1.2.3.4") -> tuple[str, Path]:
    """A file in the storage layout that has no instances row (written, then the node died)."""
    rel = f"{name}/{name}.1/{name}.1.1.dcm"
    path = node.store.root / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"row-less")
    _age(path)
    return rel, path


def test_leftover_temporary_files_are_deleted(node: Node) -> None:
    stored = _ingest(node)
    series_dir = (node.store.root / stored[0]).parent
    old_tmp = series_dir / ".incoming-k3j2h1.tmp"  # an atomic write cut by a crash
    old_tmp.write_bytes(b"half an instance")
    _age(old_tmp)
    fresh_tmp = series_dir / ".incoming-zz9.tmp"  # being written by another process right now
    fresh_tmp.write_bytes(b"in flight")

    report = reconcile_storage(node.db, node.store, grace_seconds=60)
    assert (report.tmp_deleted, report.recent, report.rowless, report.missing) == (1, 1, 0, 0)
    assert not old_tmp.exists() and fresh_tmp.exists()
    assert all((node.store.root / p).is_file() for p in stored)
    assert report.files == 3 and report.rows == 3

    # With no grace the in-flight one goes too (what a start-up after a crash sees).
    report = reconcile_storage(node.db, node.store, grace_seconds=0)
    assert report.tmp_deleted == 1 and not fresh_tmp.exists()
    assert _rows(node) == 3


def test_rowless_file_is_quarantined_and_reported(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    stored = _ingest(node)
    rel, path = _rowless(node)
    foreign = node.store.root / "README.txt"  # not the node's layout: left alone
    foreign.write_text("operator notes")
    _age(foreign)

    dry = reconcile_storage(node.db, node.store, grace_seconds=60, dry_run=True)
    assert (dry.rowless, dry.quarantined, dry.foreign) == (1, 0, 1) and path.is_file()

    caplog.set_level(logging.WARNING, logger="pacs_node.ingest.reconcile")
    caplog.clear()
    report = reconcile_storage(node.db, node.store, grace_seconds=60)
    assert (report.rowless, report.quarantined, report.foreign, report.missing) == (1, 1, 1, 0)
    assert not path.exists() and not path.parent.exists()  # emptied study/series directories removed
    assert report.quarantine_dir is not None
    qdir = Path(report.quarantine_dir)
    assert qdir.parent == node.store.root / QUARANTINE_DIR
    assert (qdir / rel).read_bytes().endswith(b"row-less")  # relative path kept
    manifest = json.loads((qdir / "MANIFEST.json").read_text())
    assert [f["path"] for f in manifest["files"]] == [rel] and manifest["reason"] == "no instances row"
    assert foreign.is_file() and all((node.store.root / p).is_file() for p in stored)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 row-less file(s) found, 1 quarantined" in line and "1.2.3.4" not in line.replace(str(qdir), "")

    # The quarantine is never scanned as instances: a second run is clean
    # (the foreign file is still reported, and still left alone).
    again = reconcile_storage(node.db, node.store, grace_seconds=60)
    assert (again.rowless, again.quarantined, again.files, again.foreign) == (0, 0, 4, 1)


def test_row_whose_file_is_missing_is_reported(node: Node) -> None:
    stored = _ingest(node)
    (node.store.root / stored[1]).unlink()
    with node.db.read_connection() as c:
        missing_id = c.execute(select(Instance.id).where(Instance.path == stored[1])).scalar_one()

    report = reconcile_storage(node.db, node.store, grace_seconds=0)
    assert (report.missing, report.missing_ids, report.rowless, report.tmp_deleted) == (1, [missing_id], 0, 0)
    assert report.anomalies
    assert _rows(node) == 3  # the row is kept: reported, not deleted


def test_too_many_rowless_files_are_not_moved(node: Node) -> None:
    """A storage root that does not belong to the database (wrong database.url)."""
    paths = [_rowless(node, f"1.2.3.{i}")[1] for i in range(3)]
    report = reconcile_storage(node.db, node.store, grace_seconds=0, quarantine_limit=2)
    assert report.refused and report.rowless == 3 and report.quarantined == 0
    assert all(p.is_file() for p in paths)
    node.reconcile = report
    check = reconcile_check(node)
    assert check["ok"] is False and check["last"]["rowless"] == 3
    forced = reconcile_storage(node.db, node.store, grace_seconds=0, quarantine_limit=2, force=True)
    assert forced.quarantined == 3 and not any(p.exists() for p in paths)


def _server_settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, db_url, storage__reconcile_grace_seconds="0")


def test_node_server_reconciles_before_accepting_and_reports_on_healthz(tmp_path: Path, db_url: str) -> None:
    from pacs_node.serve import NodeServer

    settings = _server_settings(tmp_path, db_url)
    node = Node.from_settings(settings, migrate=True)
    stored = _ingest(node)
    _rowless(node)
    tmp = (node.store.root / stored[0]).parent / ".incoming-abc.tmp"
    tmp.write_bytes(b"cut")
    (node.store.root / stored[2]).unlink()

    class Dispatcher:
        def enqueue_process(self, job_id: int) -> None:
            pass

        def enqueue_delivery(self, job_id: int) -> None:
            pass

    server = NodeServer(node, dispatcher=Dispatcher())
    started_scp = []
    original = server.dimse.start

    def start_scp() -> None:
        # The SCP starts only once the storage root is reconciled.
        started_scp.append((node.reconcile is not None, tmp.exists()))
        original()

    server.dimse.start = start_scp  # type: ignore[method-assign]
    server.start_background()
    try:
        assert started_scp == [(True, False)]
        r = httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", headers=TEST_AUTH, timeout=10)
        body = r.json()["checks"]["reconcile"]
        assert body["ok"] is True and body["interrupted_studies"] == 0
        last = body["last"]
        assert (last["tmp_deleted"], last["quarantined"], last["missing"]) == (1, 1, 1)
    finally:
        server.stop()
        node.close()


def test_cli_storage_reconcile_dry_run_then_real(tmp_path: Path, db_url: str) -> None:
    settings = _server_settings(tmp_path, db_url)
    node = Node.from_settings(settings, migrate=True)
    try:
        _ingest(node, 2)
        rel, path = _rowless(node)
    finally:
        node.close()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[storage]\nroot = "{settings.storage.root}"\nmin_free_bytes = 0\n'
                   f'[database]\nurl = "{settings.database.url}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(cfg), "storage", "reconcile",
                               *args], capture_output=True, text=True, timeout=60)

    res = cli("--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["dry_run"], report["rowless"], report["quarantined"], report["files"]) == (True, 1, 0, 3)
    assert path.is_file()
    res = cli("--grace", "0")
    assert res.returncode == 0, res.stderr
    assert "1 row-less file(s) found, 1 quarantined" in res.stdout
    assert not path.exists() and list((settings.storage.root / QUARANTINE_DIR).glob(f"*/{rel}"))
