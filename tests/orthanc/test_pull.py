"""Pull mode against a real Orthanc: the node retrieves a study it does not
hold from a configured source (DICOMweb: QIDO-RS + WADO-RS; DIMSE: C-FIND +
C-GET, C-FIND + C-MOVE to the node's own SCP), then runs the usual job flow.
Through the API (``POST /api/v1/studies/{uid}/analyze {"source": ...}``) and
the CLI (``pacs-node analyze UID --source NAME``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from nodetest import make_settings
from pacs_node.node import Node
from pacs_node.pull.base import SourceError
from pacs_node.pull.service import PullService
from pacs_node.pull.settings import load_sources
from served_node import Site, instance_rows, small_study, study_row, synthetic_study

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(180)]


def test_pull_over_dicomweb_through_the_api_runs_the_job(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = synthetic_study(tmp_path / "study", seed=9301, slices=12)
    orthanc.upload(files)
    assert node.jobs(study_uid) == []

    r = node.api("POST", f"/api/v1/studies/{study_uid}/analyze", json={"source": "orthanc-web"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "queued"
    pulled = body["pulled"]
    assert (pulled["source"], pulled["method"], pulled["expected"], pulled["received"], pulled["stored"],
            pulled["duplicates"], pulled["failed"]) == ("orthanc-web", "WADO-RS", 12, 12, 12, 0, 0), pulled
    rows = instance_rows(node, study_uid)
    assert len(rows) == 12 and {(src, aet) for _, src, aet in rows} == {("pull", None)}

    (job,) = node.wait_jobs(study_uid, 1, {"done"})
    assert job.id == body["job_id"]
    detail = node.job(job.id)
    assert detail.reason == "analysis requested" and detail.study_version == 1
    # Its SEG and SR went back to the archive the study came from.
    assert orthanc.find_instance(next(o.sop_instance_uid for o in detail.outputs if o.kind == "seg"))
    time.sleep(1.5)  # the pulled instances never start a second job by themselves
    assert len(node.jobs(study_uid)) == 1


def test_pull_with_c_get_through_the_cli(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = small_study(tmp_path / "study", n_series=2, per_series=3)
    orthanc.upload(files)

    res = node.cli("analyze", study_uid, "--source", "orthanc-get", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["state"] == "skipped"  # OT series: routed, nothing to analyse
    assert (out["pulled"]["method"], out["pulled"]["received"], out["pulled"]["stored"]) == ("C-GET", 6, 6)
    rows = instance_rows(node, study_uid)
    assert sorted(r[0] for r in rows) == sorted(p.stem for p in files)
    assert {(src, aet) for _, src, aet in rows} == {("pull", orthanc.aet)}
    assert [j.id for j in node.jobs(study_uid)] == [out["job_id"]]

    # Pulled again: nothing new, the study is analysed again (version 2).
    res = node.cli("analyze", study_uid, "--source", "orthanc-get")
    assert res.returncode == 0, res.stderr
    assert "skipped for study" in res.stdout and "(0 new, 6 already stored)" in res.stdout, res.stdout
    jobs = node.jobs(study_uid)
    assert [j.study_version for j in jobs] == [1, 2]


def test_pull_with_c_move_to_the_node_itself(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = small_study(tmp_path / "study", n_series=1, per_series=4)
    orthanc.upload(files)

    r = node.api("POST", f"/api/v1/studies/{study_uid}/analyze", json={"source": "orthanc-move"})
    assert r.status_code == 202, r.text
    pulled = r.json()["pulled"]
    assert (pulled["method"], pulled["received"], pulled["stored"], pulled["failed"]) == ("C-MOVE", 4, 4, 0)
    # C-MOVEd instances arrive at the node's SCP from Orthanc.
    assert {(src, aet) for _, src, aet in instance_rows(node, study_uid)} == {("dimse", orthanc.aet)}
    # Orthanc's C-STOREs come from AE ORTHANC, whose studies are checked for
    # completeness; the pull holds the assembler back: exactly one job.
    time.sleep(2.0)
    assert [j.id for j in node.jobs(study_uid)] == [r.json()["job_id"]]
    assert study_row(node, study_uid)["num_instances"] == 4


def test_pull_of_a_study_the_source_does_not_have(site: Site) -> None:
    node = site.node
    missing = generate_uid()
    for source in ("orthanc-web", "orthanc-move"):
        r = node.api("POST", f"/api/v1/studies/{missing}/analyze", json={"source": source})
        assert r.status_code == 404, r.text
        assert r.json() == {"detail": f"study {missing} not found on source {source}"}
    res = node.cli("analyze", missing, "--source", "orthanc-get")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [f"pacs-node: study {missing} not found on source orthanc-get"]
    assert node.api("POST", f"/api/v1/studies/{missing}/analyze", json={"source": "nope"}).status_code == 400
    assert node.jobs(missing) == []


def test_c_move_to_a_destination_the_source_does_not_know(site: Site, tmp_path: Path) -> None:
    orthanc = site.orthanc
    study_uid, files = small_study(tmp_path / "study", n_series=1, per_series=2)
    orthanc.upload(files)
    node = Node.from_settings(make_settings(tmp_path, f"sqlite:///{tmp_path / 'n.db'}"), migrate=True)
    try:
        service = PullService(node, load_sources([orthanc.source("c-move", move_destination="NOBODY")], "PACSNODE"))
        with pytest.raises(SourceError, match="source knows the move destination 'NOBODY'") as err:
            service.pull("orthanc-c-move", study_uid)
        assert err.value.http_status == 502
    finally:
        node.close()
