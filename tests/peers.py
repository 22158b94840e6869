"""Real peers for delivery tests, reusable: Orthanc (``start_orthanc``,
``OrthancServer``), dcmtk storescp (``StoreSCP``) and a node database with a
job whose outputs are on disk (``make_job_with_outputs``). The pytest fixtures
wrapping them are in ``tests/deliver/conftest.py``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from scipy import ndimage

from dicom_factory import make_study
from nodetest import free_port, require_tool, tcp_open
from pacs_node.db.migrate import upgrade
from pacs_node.db.models import Job, Study
from pacs_node.db.session import Database
from worker.outputs.build import WrittenOutput, build_outputs, save_output_rows, write_outputs
from worker.outputs.settings import OutputSettings
from worker.outputs.source import SourceSeries
from worker.outputs.types import AlgorithmInfo


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    """Wait until 127.0.0.1:port accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        if tcp_open("127.0.0.1", port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ---------------------------------------------------------------- Orthanc
@dataclass
class OrthancServer:
    """A running Orthanc with DICOMweb, on loopback ports.

    ``stop()`` ends the process; ``restart()`` starts a new one with the same
    configuration (same ports, same storage and index directories).
    """

    http_port: int
    dicom_port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    aet: str = "ORTHANC"
    config_path: Path | None = None
    #: Name of the node in ``DicomModalities`` / ``DicomWeb.Servers`` (None: not declared).
    node_name: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any) -> Any:
        r = httpx.post(self.url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body), timeout=30)
        r.raise_for_status()
        return r.json()

    def upload(self, files: list[Path] | list[bytes]) -> list[str]:
        """``POST /instances`` each file; the Orthanc instance ids."""
        ids = []
        for f in files:
            data = f if isinstance(f, bytes) else Path(f).read_bytes()
            ids.append(str(self.post("/instances", data)["ID"]))
        return ids

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def instance_count(self) -> int:
        return len(self.instances())

    def series(self) -> list[dict[str, Any]]:
        return list(self.get("/series?expand"))

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, or None."""
        hits = self.post("/tools/lookup", sop_instance_uid)
        return next((h["ID"] for h in hits if h["Type"] == "Instance"), None)

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc id of the study with this Study Instance UID, or None."""
        hits = self.post("/tools/lookup", study_instance_uid)
        return next((h["ID"] for h in hits if h["Type"] == "Study"), None)

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def file(self, instance_id: str) -> bytes:
        r = httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def clear(self) -> None:
        """Delete every patient (and so every instance)."""
        for pid in self.get("/patients"):
            httpx.delete(f"{self.url}/patients/{pid}", timeout=30).raise_for_status()

    def destination(self, kind: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
        """A ``[[destinations]]`` table pointing at this server."""
        if kind == "dimse":
            base: dict[str, Any] = {"name": name or "orthanc-dimse", "kind": "dimse", "host": "127.0.0.1",
                                    "port": self.dicom_port, "ae_title": self.aet}
        else:
            base = {"name": name or "orthanc-stow", "kind": "stowrs", "url": self.dicomweb_url}
        base.update(timeout=10, max_attempts=2, backoff_seconds=0.01)
        base.update(extra)
        return base

    def source(self, kind: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
        """A ``[[sources]]`` table pointing at this server: ``"dicomweb"``,
        ``"c-get"`` or ``"c-move"``."""
        if kind == "dicomweb":
            base: dict[str, Any] = {"name": name or "orthanc-web", "kind": "dicomweb", "url": self.dicomweb_url}
        else:
            base = {"name": name or f"orthanc-{kind}", "kind": "dimse", "host": "127.0.0.1",
                    "port": self.dicom_port, "ae_title": self.aet, "retrieve": kind}
        base.update(timeout=10)
        base.update(extra)
        return base

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process: SIGTERM (Orthanc keeps serving for a second or
        two while it shuts down), or at once with ``kill=True`` (SIGKILL)."""
        if kill and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        _stop(self.process)

    def restart(self, timeout: float = 30.0) -> None:
        """Start Orthanc again with the same configuration (ports, storage)."""
        assert self.config_path is not None
        self.stop()
        self.process = _launch_orthanc(self.config_path, self.workdir, self.http_port, self.dicom_port, timeout)


def _launch_orthanc(cfg: Path, workdir: Path, http_port: int, dicom_port: int,
                    timeout: float) -> subprocess.Popen[bytes]:
    exe = require_tool("Orthanc")
    with open(workdir / "orthanc.log", "ab") as log:
        proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TCP_NODELAY": "1"}, cwd=workdir)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({proc.returncode}); see {workdir / 'orthanc.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/system", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Orthanc did not answer GET /system")
            time.sleep(0.05)
        wait_port(dicom_port, proc)
    except BaseException:
        _stop(proc)
        raise
    return proc


@contextlib.contextmanager
def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    timeout: float = 30.0,
    node_aet: str | None = None,
    node_host: str = "127.0.0.1",
    node_port: int | None = None,
    node_dicomweb_url: str | None = None,
    node_name: str = "pacsnode",
    lua_scripts: Sequence[str | Path] = (),
    stable_age: int | None = None,
    http_port: int | None = None,
    dicom_port: int | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Iterator[OrthancServer]:
    """Start Orthanc (DICOM + HTTP on free loopback ports, DICOMweb plugin,
    ``RemoteAccessAllowed: false``, ``TCP_NODELAY=1``) in ``workdir``; stop it on exit.

    Parameters
    ----------
    node_aet, node_host, node_port:
        Declare the node as DICOM modality ``node_name`` (C-STORE target of
        ``POST /modalities/{node_name}/store``, C-MOVE destination, and
        allowed to C-FIND / C-GET / C-MOVE).
    node_dicomweb_url:
        Declare the node as DICOMweb server ``node_name`` (``DicomWeb.Servers``).
    lua_scripts:
        Lua sources (text) or ``.lua`` files for ``LuaScripts``.
    stable_age:
        ``StableAge`` in seconds (when ``OnStableStudy`` fires).
    http_port, dicom_port:
        Fixed ports (default: free ones).
    extra_config:
        Merged into the configuration last.
    """
    require_tool("Orthanc")
    plugin_dir = Path("/usr/share/orthanc/plugins")
    plugins = [str(p) for p in sorted(plugin_dir.glob("libOrthancDicomWeb.so*"))] or [str(plugin_dir)]
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    dicomweb: dict[str, Any] = {"Enable": True, "Root": "/dicom-web/"}
    config: dict[str, Any] = {
        "Name": "pacs-node-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "Plugins": plugins,
        "DicomWeb": dicomweb,
        "StorageCompression": False,
        "SaveJobs": False,
        "HttpTimeout": 30,
    }
    if node_aet is not None and node_port is not None:
        config["DicomModalities"] = {node_name: {
            "AET": node_aet, "Host": node_host, "Port": node_port,
            "AllowEcho": True, "AllowFind": True, "AllowGet": True, "AllowMove": True, "AllowStore": True,
        }}
    if node_dicomweb_url is not None:
        dicomweb["Servers"] = {node_name: [node_dicomweb_url]}
    if stable_age is not None:
        config["StableAge"] = stable_age
    if lua_scripts:
        paths = []
        for i, script in enumerate(lua_scripts):
            if isinstance(script, Path):
                paths.append(str(script))
            else:
                p = workdir / f"script-{i}.lua"
                p.write_text(script)
                paths.append(str(p))
        config["LuaScripts"] = paths
    if extra_config:
        config.update(extra_config)
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    proc = _launch_orthanc(cfg, workdir, http_port, dicom_port, timeout)
    server = OrthancServer(http_port=http_port, dicom_port=dicom_port, workdir=workdir, process=proc, aet=aet,
                           config_path=cfg, node_name=node_name if (node_aet or node_dicomweb_url) else None)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- storescp
@dataclass
class StoreSCP:
    """A dcmtk storescp process writing received files to ``out_dir``."""

    port: int
    aet: str
    out_dir: Path
    process: subprocess.Popen[bytes]

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.out_dir.iterdir()) if p.is_file()]

    def stop(self) -> None:
        _stop(self.process)

    def destination(self, name: str = "storescp", **extra: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": self.port,
                                "ae_title": self.aet, "timeout": 10, "backoff_seconds": 0.01}
        base.update(extra)
        return base


# ---------------------------------------------------------------- a job with outputs
ALGORITHM = AlgorithmInfo(name="pacs-node-anomaly", version="pacs-node-engine/0.1.0+deadbeef0000",
                          checksum="deadbeef" * 8, threshold=0.5)


@dataclass
class _Finding:
    label: int
    volume_mm3: float
    centroid_patient: tuple[float, float, float]
    bbox_zyx: tuple[int, int, int, int, int, int]
    max_score: float
    mean_score: float
    voxel_count: int


@dataclass
class _Prediction:
    mask: np.ndarray
    anomaly_map: np.ndarray
    findings: list[_Finding] = field(default_factory=list)
    study_score: float = 1.5
    threshold: float = 0.5


@dataclass
class JobWithOutputs:
    db: Database
    job_id: int
    outputs_dir: Path
    written: list[WrittenOutput]

    @property
    def sop_uids(self) -> set[str]:
        return {w.sop_instance_uid for w in self.written}

    def state(self) -> str:
        with self.db.session() as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            return job.state


def make_job_with_outputs(tmp_path: Path, *, state: str = "running", overlay: bool = False) -> JobWithOutputs:
    """A SQLite node database holding one job (in ``state``) whose SEG, map, (overlay,) SR are on disk."""
    datasets = make_study(1, 4, modality="CT")
    for i, ds in enumerate(datasets):
        ds.PixelData = (np.arange(256, dtype=np.int16).reshape(16, 16) + i).tobytes()
    source = SourceSeries.from_datasets(datasets)
    mask = np.zeros(source.shape, bool)
    mask[1:3, 4:8, 5:9] = True
    amap = np.where(mask, 0.8, 0.2).astype(np.float32)
    zs, ys, xs = np.nonzero(mask)
    finding = _Finding(1, float(mask.sum()), (float(xs.mean()), float(ys.mean()), float(zs.mean() + 1)),
                       (1, 4, 5, 2, 7, 8), 0.8, 0.8, int(mask.sum()))
    assert ndimage.label(mask)[1] == 1
    pred = _Prediction(mask=mask, anomaly_map=amap, findings=[finding])

    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(db)
    with db.session() as s:
        study = Study(study_instance_uid=source.study_instance_uid, version=1)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, study_version=1, state=state)
        s.add(job)
        s.flush()
        job_id = job.id
    # The delivery tests count two SEG instances (the binary SEG and the map as
    # a FRACTIONAL SEG), so the map is pinned; the default is a Parametric Map.
    settings = OutputSettings(overlay=overlay, anomaly_map="fractional")
    outputs_dir = tmp_path / "outputs"
    built = build_outputs(job_id=job_id, source=source, prediction=pred, algorithm=ALGORITHM, settings=settings)
    written = write_outputs(built, outputs_dir / str(job_id), settings=settings)
    with db.session() as s:
        save_output_rows(s, job_id, written, outputs_dir)
    return JobWithOutputs(db=db, job_id=job_id, outputs_dir=outputs_dir, written=written)
