"""Orthanc auto-routes with the shipped Lua script (``deploy/orthanc/autoroute.lua``,
``OnStableStudy``), the node answers over STOW-RS, and nothing loops."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodetest import free_port
from peers import OrthancServer, start_orthanc
from roundtrip_checks import check_results_in_archive, study_sops
from served_node import ServedNode, make_node, synthetic_study

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(240)]

DEPLOY_LUA = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "autoroute.lua"
STABLE_AGE = 2


@pytest.fixture(scope="module")
def lua_site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[OrthancServer, ServedNode]]:
    root = tmp_path_factory.mktemp("lua")
    node_dicom, node_http = free_port(), free_port()
    with start_orthanc(root / "orthanc", node_aet="PACSNODE", node_port=node_dicom, lua_scripts=[DEPLOY_LUA],
                       stable_age=STABLE_AGE, extra_config={"UserMetadata": {"PacsNodeForwarded": 4242}}) as orthanc:
        node = make_node(
            root / "node", model=tiny_model, dicom_port=node_dicom, http_port=node_http,
            destinations=[orthanc.destination("stowrs", name="orthanc-stow", timeout=10, max_attempts=5,
                                              backoff_seconds=0.25)],
            # Completeness checked over QIDO-RS here (node A checks over C-FIND).
            sources=[orthanc.source("dicomweb", name="orthanc", calling_aets=[orthanc.aet], verify_completeness=True,
                                    completeness_timeout_seconds=3, completeness_poll_seconds=0.5)],
        )
        node.start()
        try:
            yield orthanc, node
        finally:
            node.stop()


def test_lua_on_stable_study_auto_route_and_stowrs_back(lua_site: tuple[OrthancServer, ServedNode],
                                                      tmp_path: Path) -> None:
    orthanc, node = lua_site
    study_uid, files = synthetic_study(tmp_path / "study", seed=9101)
    orthanc.upload(files)

    # Orthanc: stable after StableAge -> Lua sends the images to the node -> job -> STOW-RS back.
    (job,) = node.wait_jobs(study_uid, 1, {"done"}, timeout=90)
    detail = node.job(job.id)
    assert "verified complete against source orthanc" in (detail.reason or ""), detail.reason
    assert [(d.destination, d.status, d.status_code) for d in detail.deliveries] == [("orthanc-stow", "success", 200)]
    results = check_results_in_archive(orthanc, node, job.id, study_uid, files)

    # The SEG/SR made the study change: Orthanc fires OnStableStudy again once
    # it is stable; the script skips them (and the images it forwarded
    # already): the node gets nothing, no second job.
    oid = orthanc.find_study(study_uid)
    assert oid is not None
    deadline = time.monotonic() + STABLE_AGE + 20
    while not orthanc.get(f"/studies/{oid}")["IsStable"]:
        assert time.monotonic() < deadline, "Orthanc never marked the study stable again"
        time.sleep(0.2)
    time.sleep(2.5)  # > stable_seconds + a few scheduler ticks of the node
    log = (orthanc.workdir / "orthanc.log").read_text(errors="replace")
    assert log.count("pacs-node autoroute: study") == 1, log[-3000:]  # the images, once
    assert [j.id for j in node.jobs(study_uid)] == [job.id]
    (mine,) = [s for s in node.api("GET", "/api/v1/studies").json() if s["study_instance_uid"] == study_uid]
    assert mine["version"] == 1 and mine["num_instances"] == len(files), mine
    # Orthanc holds the images + one SEG + one SR.
    assert study_sops(orthanc, study_uid) == results.study_sops
    assert len(results.study_sops) == len(files) + 2
