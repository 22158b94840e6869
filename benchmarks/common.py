"""Shared helpers for the benchmarks (not tests: nothing here is imported by
``tests/`` and nothing here imports from ``tests/``).

* machine description (``machine_info``) and an fsync latency probe;
* synthetic data: 512x512 16-bit CT slices, MR studies from the engine's
  synthetic phantoms (``worker.engine.synthetic.make_case``);
* peers on free loopback ports, each a context manager that always stops its
  process: ``node`` (``pacs-node serve``), ``storescp`` (dcmtk), ``orthanc``;
* ``storescu`` (dcmtk) runs, timed;
* small statistics and JSON/plot output helpers.

dcmtk tools are always called by absolute path (the venv's pynetdicom apps
shadow them) and, like Orthanc, with ``TCP_NODELAY=1`` in the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from paths import (  # noqa: E402,F401 - re-exported for the scripts
    BENCH_DIR,
    COMPREHENSIVE_3D_SR,
    CT_IMAGE_STORAGE,
    IMG_DIR,
    MR_IMAGE_STORAGE,
    NODELAY_ENV,
    ORTHANC,
    OUT_DIR,
    PG_URL,
    REDIS_URL,
    REPO,
    RESULTS_DIR,
    SEG_STORAGE,
    STORESCP,
    STORESCU,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


from machine import _run_text, durable_write_ceiling, fsync_probe, machine_info  # noqa: E402,F401 - re-exported


# ---------------------------------------------------------------- statistics / output
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def write_json(name: str, payload: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    p = OUT_DIR / name
    p.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return p


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------- ports / processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0,
              log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}\n{tail}")
        if tcp_open(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL: only this process (never by name)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- synthetic data
def _base_dataset(*, sop_class: str, study_uid: str, series_uid: str, modality: str, instance_number: int,
                  rows: int, cols: int, z: float, series_description: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "BENCH-001"
    ds.PatientName = "Bench^Patient"
    ds.AccessionNumber = "BENCH1"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyDescription = "Benchmark"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def make_ct_series(n: int, directory: Path, *, size: int = 512, seed: int = 0) -> list[Path]:
    """``n`` uncompressed 16-bit ``size``x``size`` CT slices of one series (cached in ``directory``)."""
    from pydicom.uid import generate_uid

    done = directory / ".complete"
    if done.exists() and done.read_text().strip() == f"{n} {size} {seed}":
        return sorted(directory.glob("*.dcm"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    study_uid, series_uid = generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.42 * size) ** 2
    paths = []
    for i in range(n):
        ds = _base_dataset(sop_class=CT_IMAGE_STORAGE, study_uid=study_uid, series_uid=series_uid, modality="CT",
                           instance_number=i + 1, rows=size, cols=size, z=i * 1.0, series_description="BENCH CT")
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        img = np.where(body, 1024 + 40, 0) + rng.integers(-20, 20, (size, size))
        ds.PixelData = img.astype(np.int16).tobytes()
        p = directory / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    done.write_text(f"{n} {size} {seed}")
    return paths


def mr_volume(slices: int, *, seed: int = 4242, size: int = 256,
              spacing: tuple[float, float, float] = (1.0, 0.9, 0.9)) -> np.ndarray:
    """A FLAIR head with one lesion, generated from the MNI template (``worker.engine.lesions``),
    ``slices`` x ``size`` x ``size`` at ``spacing``, int16 in 0..3000; cached as .npy under ``out/data``."""
    cache = OUT_DIR / "data" / f"head-{slices}x{size}-s{seed}-{'x'.join(map(str, spacing))}.npy"
    if cache.exists():
        return np.load(cache)
    from worker.engine.anatomy import SubjectConfig
    from worker.engine.lesions import make_lesion_subject

    cfg = SubjectConfig(slices=slices, slice_spacing_mm=spacing[0], matrix=size,
                        fov_mm=(size * spacing[1], size * spacing[1]), partial_coverage=0.0)
    case = make_lesion_subject(seed, cfg, contrast="flair", n=(1, 1))
    v = np.asarray(case.volume.array, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    scaled = np.round((v - lo) / (hi - lo + 1e-9) * 3000).astype(np.int16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, scaled)
    return scaled


def write_mr_series(volume: np.ndarray, directory: Path, *,
                    spacing: tuple[float, float, float] = (1.0, 0.9, 0.9)) -> tuple[str, list[Path]]:
    """Write ``volume`` as a new MR study (fresh UIDs on every call) of single-frame slices."""
    from pydicom.uid import generate_uid

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for z in range(volume.shape[0]):
        ds = _base_dataset(sop_class=MR_IMAGE_STORAGE, study_uid=study_uid, series_uid=series_uid, modality="MR",
                           instance_number=z + 1, rows=volume.shape[1], cols=volume.shape[2], z=z * spacing[0],
                           series_description="AX FLAIR")
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.PixelData = volume[z].tobytes()
        p = directory / f"{z:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return study_uid, paths


# ---------------------------------------------------------------- storescu
@dataclass
class SendResult:
    seconds: float
    n: int
    nbytes: int
    returncode: int
    stderr: str = ""


def storescu(files: Sequence[Path], port: int, *, aec: str, aet: str = "BENCH") -> subprocess.Popen[bytes]:
    """Start one dcmtk storescu sending ``files`` in one association."""
    return subprocess.Popen([STORESCU, "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=NODELAY_ENV)


def send_parallel(files: Sequence[Path], port: int, *, aec: str, associations: int = 1) -> SendResult:
    """Send ``files`` split over ``associations`` concurrent storescu processes; wall time of all."""
    chunks = [list(files[i::associations]) for i in range(associations)]
    nbytes = sum(p.stat().st_size for p in files)
    t0 = time.perf_counter()
    procs = [storescu(c, port, aec=aec) for c in chunks if c]
    errs = []
    rc = 0
    for p in procs:
        _, err = p.communicate(timeout=3600)
        rc = rc or p.returncode
        errs.append(err.decode(errors="replace"))
    seconds = time.perf_counter() - t0
    return SendResult(seconds=seconds, n=len(files), nbytes=nbytes, returncode=rc, stderr="\n".join(errs)[-2000:])


# ---------------------------------------------------------------- storescp
@dataclass
class StoreSCP:
    port: int
    aet: str
    out_dir: Path
    process: subprocess.Popen[bytes]

    def count(self) -> int:
        return sum(1 for p in self.out_dir.rglob("*") if p.is_file())


@contextlib.contextmanager
def storescp(out_dir: Path, aet: str = "STORESCP") -> Iterator[StoreSCP]:
    """dcmtk storescp writing every received instance under ``out_dir`` (its defaults otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-aet", aet, "-od", str(out_dir), str(port)], env=NODELAY_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield StoreSCP(port, aet, out_dir, proc)
    finally:
        stop_process(proc)


# ---------------------------------------------------------------- Orthanc
@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    aet: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, timeout: float = 30) -> Any:
        import httpx

        r = httpx.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any, timeout: float = 600) -> Any:
        import httpx

        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        r = httpx.post(self.url + path, content=content, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


@contextlib.contextmanager
def orthanc(workdir: Path, *, aet: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
            timeout: float = 60.0) -> Iterator[Orthanc]:
    """Debian's Orthanc with its default storage (filesystem + SQLite index) on free loopback ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {
        "Name": "pacs-node-bench",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "Plugins": [],
        "DicomModalities": modalities or {},
        "SaveJobs": False,
        "HttpTimeout": 600,
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    logf = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=logf, stderr=subprocess.STDOUT, env=NODELAY_ENV, cwd=workdir)
    try:
        import httpx

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
            time.sleep(0.1)
        wait_port(dicom_port, proc)
        yield Orthanc(http_port, dicom_port, workdir, proc, aet)
    finally:
        stop_process(proc)
        logf.close()


# ---------------------------------------------------------------- PostgreSQL schema
@contextlib.contextmanager
def pg_schema(prefix: str = "bench") -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema (dropped on exit)."""
    from sqlalchemy import create_engine, text

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    eng = create_engine(PG_URL)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with eng.begin() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        eng.dispose()


def pg_available() -> bool:
    try:
        from sqlalchemy import create_engine, text

        eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


def db_upgrade(url: str) -> None:
    from pacs_node.db.migrate import upgrade
    from pacs_node.db.session import Database

    db = Database(url)
    try:
        upgrade(db)
    finally:
        db.dispose()


# ---------------------------------------------------------------- the node
@dataclass
class NodeProc:
    dicom_port: int
    http_port: int
    config: Path
    workdir: Path
    process: subprocess.Popen[bytes]
    db_url: str
    ae_title: str = "PACSNODE"
    extra_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.workdir / "node.log"

    def count_instances(self) -> int:
        from sqlalchemy import create_engine, text

        eng = create_engine(self.db_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with eng.connect() as c:
                return int(c.execute(text("SELECT count(*) FROM instances")).scalar_one())
        finally:
            eng.dispose()


def node_config(workdir: Path, *, db_url: str | None = None, fsync: bool = True, broker: str = "embedded",
                start_worker: bool = False, stable_seconds: float = 3600.0, scheduler_interval: float = 1.0,
                model: Path | None = None, extra: str = "", log_level: str = "WARNING",
                dicom_port: int | None = None, http_port: int | None = None) -> tuple[Path, int, int, str]:
    """Write a node config under ``workdir``; returns (path, dicom port, http port, database URL)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    while http_port == dicom_port:
        http_port = free_port()
    db_url = db_url or f"sqlite:///{workdir / 'pacs-node.db'}"
    engine = f'[engine]\nmodel = "{model}"\ndevice = "cpu"\nprogress = false\n' if model else ""
    cfg = workdir / "node.toml"
    cfg.write_text(f"""
[dicom]
port = {dicom_port}
[http]
port = {http_port}
[storage]
root = "{workdir / 'storage'}"
fsync = {str(fsync).lower()}
[database]
url = "{db_url}"
[queue]
broker_url = "{broker}"
start_worker = {str(start_worker).lower()}
[study]
stable_seconds = {stable_seconds}
force_complete_seconds = {max(600.0, stable_seconds)}
scheduler_interval_seconds = {scheduler_interval}
[logging]
level = "{log_level}"
{engine}
{extra}
""")
    return cfg, dicom_port, http_port, db_url


@contextlib.contextmanager
def node(workdir: Path, *, env: dict[str, str] | None = None, **kw: Any) -> Iterator[NodeProc]:
    """``pacs-node serve`` as a subprocess (stopped with SIGTERM on exit)."""
    cfg, dicom_port, http_port, db_url = node_config(workdir, **kw)
    if not db_url.startswith("sqlite"):
        db_upgrade(db_url)
    logf = open(workdir / "node.log", "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "pacs_node", "--config", str(cfg), "serve"], stdout=logf,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=workdir)
    try:
        wait_port(dicom_port, proc, log_file=workdir / "node.log")
        wait_port(http_port, proc, log_file=workdir / "node.log")
        yield NodeProc(dicom_port, http_port, cfg, workdir, proc, db_url)
    finally:
        stop_process(proc, timeout=60)
        logf.close()


@contextlib.contextmanager
def worker_process(config: Path, log_file: Path, queues: str = "gpu,io",
                   env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A ``pacs-node worker`` process (stopped with SIGTERM on exit)."""
    logf = open(log_file, "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "pacs_node", "--config", str(config), "worker", "--queues", queues],
                            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            cwd=config.parent)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=60)
        logf.close()


def export_tree(rev: str, parts: Sequence[str] = ("pacs_node", "alembic")) -> Path:
    """``parts`` of the repository as of git ``rev``, extracted under ``out/src-<rev>`` (put it first on
    PYTHONPATH to run that revision next to the current one, in the same benchmark run)."""
    sha = _run_text(["git", "-C", str(REPO), "rev-parse", "--short", rev])
    if not sha:
        raise ValueError(f"unknown git revision {rev!r}")
    dest = OUT_DIR / f"src-{sha}"
    missing = [p for p in parts if not (dest / p).exists()]
    if missing:
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, *missing],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def drop_caches_best_effort() -> None:
    """Flush dirty pages between runs so one target's writeback does not land in the next one's timing."""
    os.sync()
