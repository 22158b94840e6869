"""Completeness verified against the archive: Orthanc holds the study, only
part of it reaches the node (storescu with calling AE ORTHANC, which node A
maps to its source "orthanc-get" with ``verify_completeness``); the node
waits (C-FIND IMAGE level) and then proceeds, noting what was missing."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

from served_node import COMPLETENESS_TIMEOUT, Site, small_study, study_row

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(120)]

STABLE = 1.0


def _iso(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def test_incomplete_study_waits_then_proceeds_with_a_note(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = small_study(tmp_path / "study", n_series=2, per_series=5)
    orthanc.upload(files)  # the archive holds 10 instances
    node.send(files[:6], calling_aet=orthanc.aet)  # the node gets 6
    sent_at = time.monotonic()

    (job,) = node.wait_jobs(study_uid, 1, {"skipped"}, timeout=30)  # OT: routed to "skipped", no inference
    waited = time.monotonic() - sent_at
    detail = node.job(job.id)
    assert f"proceeded incomplete: 6 of 10 instances after {COMPLETENESS_TIMEOUT:g} s" in (detail.reason or "")
    assert "proceeded incomplete" in (detail.events[0].message or "")  # the creation event says it too
    study = study_row(node, study_uid)
    held_back = (detail.created_at - _iso(study["last_received_at"])).total_seconds()
    assert held_back >= STABLE + COMPLETENESS_TIMEOUT - 0.3, held_back
    assert waited >= STABLE + COMPLETENESS_TIMEOUT - 0.5
    assert detail.instance_count == 6
    assert "proceeded incomplete: 6 of 10" in node.log.read_text()


def test_complete_study_proceeds_without_waiting(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = small_study(tmp_path / "study", n_series=2, per_series=5)
    orthanc.upload(files)
    node.send(files, calling_aet=orthanc.aet)

    (job,) = node.wait_jobs(study_uid, 1, {"skipped"}, timeout=30)
    detail = node.job(job.id)
    assert "verified complete against source orthanc-get (10 instances)" in (detail.reason or "")
    held_back = (detail.created_at - _iso(study_row(node, study_uid)["last_received_at"])).total_seconds()
    assert held_back < STABLE + 1.5, held_back  # stable + a tick or two + one C-FIND, no timeout


def test_late_instances_complete_the_study_during_the_wait(site: Site, tmp_path: Path) -> None:
    """A sender pausing longer than stable_seconds mid-study: one job, with everything."""
    orthanc, node = site.orthanc, site.node
    study_uid, files = small_study(tmp_path / "study", n_series=2, per_series=5)
    orthanc.upload(files)
    node.send(files[:6], calling_aet=orthanc.aet)
    time.sleep(STABLE + 1.0)  # stable, held back by the gate
    assert node.jobs(study_uid) == []
    node.send(files[6:], calling_aet=orthanc.aet)

    (job,) = node.wait_jobs(study_uid, 1, {"skipped"}, timeout=30)
    detail = node.job(job.id)
    assert detail.instance_count == 10
    assert "verified complete against source orthanc-get (10 instances)" in (detail.reason or "")
    time.sleep(STABLE + 0.5)
    assert len(node.jobs(study_uid)) == 1
