"""Fixtures over the real peers of ``peers.py`` (Orthanc, dcmtk storescp) and
a job with real outputs. The classes and launchers are importable as
``from peers import OrthancServer, start_orthanc, StoreSCP, make_job_with_outputs``
(module ``tests/peers.py``; a unique name, unlike ``conftest``).

Orthanc::

    def test_x(orthanc: OrthancServer) -> None:       # a clean server (no instances)
        orthanc.dicom_port, orthanc.aet, orthanc.url, orthanc.dicomweb_url
        orthanc.instance_count(); orthanc.find_instance(sop_uid) -> id | None
        orthanc.get("/series"); orthanc.tags(instance_id); orthanc.clear()
        orthanc.destination("dimse") / orthanc.destination("stowrs")  # [[destinations]] tables

``orthanc_server`` is the session-wide process (started once, killed at the
end); ``orthanc`` empties it before each test. :func:`start_orthanc` is the
context manager behind them, for tests that need a server of their own.

dcmtk storescp::

    def test_y(storescp: Callable[..., StoreSCP]) -> None:
        scp = storescp()                 # free port, AE "STORESCP", files in scp.out_dir
        scp = storescp(port=p, args=["--refuse"])
        scp.received() -> list[Dataset]; scp.stop()
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodetest import free_port, require_tool
from pacs_node.db.session import Database
from peers import JobWithOutputs, OrthancServer, StoreSCP, make_job_with_outputs, start_orthanc, wait_port
from worker.outputs.build import WrittenOutput


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with start_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server: OrthancServer) -> OrthancServer:
    """The session's Orthanc, emptied."""
    orthanc_server.clear()
    return orthanc_server


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory: ``storescp(port=None, aet="STORESCP", args=())`` starts dcmtk's storescp."""
    exe = require_tool("storescp")
    started: list[StoreSCP] = []

    def start(port: int | None = None, aet: str = "STORESCP", args: tuple[str, ...] | list[str] = ()) -> StoreSCP:
        port = port or free_port()
        out = tmp_path / f"storescp-{port}-{len(started)}"
        out.mkdir()
        proc = subprocess.Popen([exe, "-aet", aet, "+xa", "-od", str(out), *args, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "TCP_NODELAY": "1"})
        wait_port(port, proc)
        scp = StoreSCP(port=port, aet=aet, out_dir=out, process=proc)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture(scope="session")
def _job_template(tmp_path_factory: pytest.TempPathFactory) -> JobWithOutputs:
    template = make_job_with_outputs(tmp_path_factory.mktemp("job-template"))
    template.db.dispose()
    return template


@pytest.fixture
def job(_job_template: JobWithOutputs, tmp_path: Path) -> Iterator[JobWithOutputs]:
    """A fresh copy (database + output files) of a ``running`` job with SEG, map and SR."""
    src = _job_template.outputs_dir.parent
    dst = tmp_path / "job"
    shutil.copytree(src, dst)
    db = Database(f"sqlite:///{dst / 'node.db'}")
    written = [
        WrittenOutput(w.built, dst / "outputs" / w.path.relative_to(_job_template.outputs_dir), w.size_bytes,
                      w.sha256, w.report)
        for w in _job_template.written
    ]
    j = JobWithOutputs(db=db, job_id=_job_template.job_id, outputs_dir=dst / "outputs", written=written)
    yield j
    db.dispose()


