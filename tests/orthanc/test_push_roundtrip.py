"""Push round trip with a real Orthanc: Orthanc sends a study to the node
(REST ``POST /modalities/pacsnode/store``), the node analyses it and returns
SEG + SR with C-STORE; retries do not duplicate; Orthanc down during the
delivery is retried until it is back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from roundtrip_checks import check_results_in_archive, study_sops
from served_node import COMPLETENESS_TIMEOUT, Site, synthetic_study

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(240)]


def test_rest_store_round_trip_over_dimse_and_retry_without_duplicates(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = synthetic_study(tmp_path / "study", seed=9201, slices=12)
    orthanc.upload(files)
    oid = orthanc.find_study(study_uid)
    orthanc.post(f"/modalities/{orthanc.node_name}/store", {"Resources": [oid], "Synchronous": True})

    (job,) = node.wait_jobs(study_uid, 1, {"done"})
    detail = node.job(job.id)
    # Pushed by AE ORTHANC = source orthanc-get, which verifies completeness over C-FIND.
    assert f"verified complete against source orthanc-get ({len(files)} instances)" in (detail.reason or "")
    assert [(d.destination, d.status, d.status_code) for d in detail.deliveries] == [("orthanc", "success", 0)]
    results = check_results_in_archive(orthanc, node, job.id, study_uid, files)
    assert len(results.study_sops) == len(files) + 2

    # Orthanc sends the whole study again, the node's own SEG and SR included:
    # the images are identical resends and the outputs are the node's own, so
    # no new study version and no new job.
    orthanc.post(f"/modalities/{orthanc.node_name}/store", {"Resources": [oid], "Synchronous": True})
    time.sleep(1.0 + 1.5)  # stable_seconds + a few scheduler ticks
    assert [j.id for j in node.jobs(study_uid)] == [job.id]
    (study,) = [s for s in node.api("GET", "/api/v1/studies").json() if s["study_instance_uid"] == study_uid]
    assert study["version"] == 1, study

    # `pacs-node jobs retry ID`: a new run of the same job replaces (does not
    # duplicate) the results in Orthanc: same SOP Instance UIDs, same count.
    res = node.cli("jobs", "retry", str(job.id))
    assert res.returncode == 0 and res.stdout.strip() == f"job {job.id} is queued", res.stderr
    rerun = node.wait_job(job.id, lambda j: j.attempts == 2 and j.state == "done")
    assert [(d.destination, d.status) for d in rerun.deliveries] == [("orthanc", "success")] * 2
    assert {o.sop_instance_uid for o in rerun.outputs} == {o.sop_instance_uid for o in detail.outputs}
    assert study_sops(orthanc, study_uid) == results.study_sops
    assert len(orthanc.get(f"/studies/{oid}/series")) == 3
    assert [j.id for j in node.jobs(study_uid)] == [job.id]


def test_orthanc_down_during_delivery_is_retried_until_it_is_back(site: Site, tmp_path: Path) -> None:
    orthanc, node = site.orthanc, site.node
    study_uid, files = synthetic_study(tmp_path / "study", seed=9202, slices=12)
    orthanc.upload(files)
    orthanc.post(f"/modalities/{orthanc.node_name}/store",
                 {"Resources": [orthanc.find_study(study_uid)], "Synchronous": True})
    orthanc.stop(kill=True)  # down at once (a SIGTERMed Orthanc serves ~2 s more)
    try:
        # The node cannot verify completeness (source down): it waits, then
        # analyses; the delivery fails and is retried.
        failed = node.wait_for(lambda: any(d.status == "error" for j in node.jobs(study_uid)
                                           for d in node.job(j.id).deliveries), timeout=90)
        assert failed
    finally:
        orthanc.restart()
    (job,) = node.wait_jobs(study_uid, 1, {"done"})
    detail = node.job(job.id)
    assert "completeness not verified: source orthanc-get unreachable" in (detail.reason or ""), detail.reason
    assert f"after {COMPLETENESS_TIMEOUT:g} s" in (detail.reason or "")
    statuses = [d.status for d in detail.deliveries]
    assert statuses[0] == "error" and statuses[-1] == "success" and statuses.count("success") == 1, statuses
    assert "connection" in (detail.deliveries[0].error or "").lower() or detail.deliveries[0].error
    results = check_results_in_archive(orthanc, node, job.id, study_uid, files)
    assert len(results.study_sops) == len(files) + 2
