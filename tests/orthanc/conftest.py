"""Fixtures of the real-PACS tests: Orthanc (``peers.start_orthanc``) with the
node declared in ``DicomModalities`` / ``DicomWeb.Servers``, and a real
``pacs-node serve`` subprocess (``served_node.ServedNode``) with the tiny
model, both started once and shared by the tests of this directory.

``site``: Orthanc "A" (no Lua) + node "A" whose destination is Orthanc's
C-STORE SCP (with quick retries) and whose sources are Orthanc over DICOMweb,
C-GET and C-MOVE; the C-GET source owns calling AE ORTHANC and verifies
completeness (timeout 3 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nodetest import free_port
from peers import start_orthanc
from served_node import COMPLETENESS_TIMEOUT, Site, make_node


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    node_dicom, node_http = free_port(), free_port()
    with start_orthanc(root / "orthanc", node_aet="PACSNODE", node_port=node_dicom,
                       node_dicomweb_url=f"http://127.0.0.1:{node_http}/dicomweb") as orthanc:
        node = make_node(
            root / "node", model=tiny_model, dicom_port=node_dicom, http_port=node_http,
            destinations=[orthanc.destination("dimse", name="orthanc", timeout=5, max_attempts=40,
                                              backoff_seconds=0.25, max_backoff_seconds=0.5)],
            sources=[
                orthanc.source("dicomweb", name="orthanc-web"),
                orthanc.source("c-get", name="orthanc-get", calling_aets=["ORTHANC"], verify_completeness=True,
                               completeness_timeout_seconds=COMPLETENESS_TIMEOUT, completeness_poll_seconds=0.5),
                orthanc.source("c-move", name="orthanc-move"),
            ],
        )
        node.start()
        try:
            yield Site(orthanc, node)
        finally:
            node.stop()
