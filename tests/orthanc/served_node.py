"""A real ``pacs-node serve`` subprocess (embedded queue + its worker, SQLite)
for the Orthanc round-trip tests, read back through SQL (cheaper than a CLI
process per poll). Import as ``from served_node import ...`` (this directory
is put on ``sys.path`` by pytest for its test modules)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nodetest import free_port, require_tool, tcp_open, token_config
from peers import OrthancServer
from pacs_node.db.session import Database
from pacs_node.jobs.queries import get_job, list_jobs
from pacs_node.jobs.schemas import JobDetail, JobSummary

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
TOKEN = "pn_orthanc-tests-" + "1" * 32
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: How long the shared node ("site") waits for instances its archive holds (seconds).
COMPLETENESS_TIMEOUT = 3.0
FINISHED = {"done", "failed", "delivery_failed", "skipped", "cancelled"}


def _toml_value(value: Any) -> str:
    if isinstance(value, (str, bool, int, float)) or (isinstance(value, list)
                                                     and all(isinstance(v, str) for v in value)):
        return json.dumps(value)  # JSON strings, numbers, booleans and string arrays are TOML too
    raise TypeError(f"cannot write {value!r} as TOML here")


def _tables(name: str, items: Iterable[dict[str, Any]]) -> str:
    out = []
    for item in items:
        out.append(f"[[{name}]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(out)


@dataclass
class ServedNode:
    """A running ``pacs-node serve`` with its configuration and database."""

    workdir: Path
    config: Path
    dicom_port: int
    http_port: int
    db_url: str
    ae_title: str = "PACSNODE"
    process: subprocess.Popen[bytes] | None = None
    _db: Database | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicomweb"

    @property
    def log(self) -> Path:
        return self.workdir / "node.log"

    @property
    def outputs_dir(self) -> Path:
        return self.workdir / "outputs"

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.db_url)
        return self._db

    # -- process ----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "pacs_node", "--config", str(self.config), "serve"],
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=NODELAY_ENV)
        deadline = time.monotonic() + timeout
        while not (tcp_open("127.0.0.1", self.dicom_port) and tcp_open("127.0.0.1", self.http_port)):
            assert self.process.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._db is not None:
            self._db.dispose()
            self._db = None

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else "(no log)"

    # -- reading SQL --------------------------------------------------------------
    def jobs(self, study_uid: str) -> list[JobSummary]:
        """The study's jobs, oldest first."""
        with self.db.sessionmaker() as s:
            return sorted(list_jobs(s, study_uid=study_uid), key=lambda j: j.id)

    def job(self, job_id: int) -> JobDetail:
        with self.db.sessionmaker() as s:
            job = get_job(s, job_id)
        assert job is not None, job_id
        return job

    def wait_jobs(self, study_uid: str, n: int = 1, states: set[str] | frozenset[str] = frozenset({"done"}),
                  timeout: float = 120.0) -> list[JobSummary]:
        """Wait until the study has ``n`` jobs, all in ``states``."""
        deadline = time.monotonic() + timeout
        jobs: list[JobSummary] = []
        while time.monotonic() < deadline:
            jobs = self.jobs(study_uid)
            if len(jobs) >= n and all(j.state in states for j in jobs):
                return jobs
            if any(j.state in FINISHED - set(states) for j in jobs):
                break
            time.sleep(0.2)
        details = [self.job(j.id).model_dump(mode="json") for j in jobs]
        raise AssertionError(f"study {study_uid}: jobs not {sorted(states)} x{n}: {json.dumps(details, indent=1)}"
                             f"\n--- node log ---\n{self.log_tail()}")

    def wait_job(self, job_id: int, predicate: Callable[[JobDetail], bool], timeout: float = 120.0) -> JobDetail:
        """Wait until ``predicate(job)`` holds."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while not predicate(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: {job.model_dump_json(indent=1)}\n--- node log ---\n"
                                     f"{self.log_tail()}")
            time.sleep(0.2)
            job = self.job(job_id)
        return job

    def wait_for(self, condition: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Poll ``condition`` until true; raise with the node's log on timeout."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout} s\n--- node log ---\n{self.log_tail()}")
            time.sleep(0.2)
        return True

    def output_file(self, job_id: int, kind: str) -> Path:
        (row,) = [o for o in self.job(job_id).outputs if o.kind == kind]
        return self.outputs_dir / row.path

    # -- talking to it ---------------------------------------------------------------
    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kwargs)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout, env=NODELAY_ENV)

    def send(self, files: Iterable[Path], calling_aet: str = "MODALITY") -> None:
        """C-STORE files with dcmtk's storescu."""
        res = subprocess.run([require_tool("storescu"), "-aet", calling_aet, "-aec", self.ae_title, "127.0.0.1",
                              str(self.dicom_port), *map(str, files)],
                             capture_output=True, text=True, env=NODELAY_ENV, timeout=60)
        assert res.returncode == 0, res.stderr


@dataclass
class Site:
    """An archive and the node it works with (the ``site`` fixture)."""

    orthanc: OrthancServer
    node: ServedNode


def make_node(workdir: Path, *, model: Path, destinations: list[dict[str, Any]],
              sources: Sequence[dict[str, Any]] = (), dicom_port: int | None = None,
              http_port: int | None = None, extra: str = "") -> ServedNode:
    """Write the configuration of a node under ``workdir`` (not started yet)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    db_url = f"sqlite:///{workdir / 'node.db'}"
    cfg = workdir / "node.toml"
    cfg.write_text(f"""
[dicom]
port = {dicom_port}
[http]
port = {http_port}
{token_config("tests", TOKEN, ["read", "write"])}[storage]
root = "{workdir / 'storage'}"
min_free_bytes = 0
[database]
url = "{db_url}"
[queue]
broker_url = "embedded"
start_worker = true
lease_seconds = 20.0
heartbeat_seconds = 2.0
[study]
stable_seconds = 1.0
scheduler_interval_seconds = 0.2
[engine]
model = "{model}"
device = "cpu"
num_threads = 1
[outputs]
anomaly_map = "none"
seg_when_empty = "empty"
{extra}
{_tables("destinations", destinations)}
{_tables("sources", sources)}
""")
    return ServedNode(workdir=workdir, config=cfg, dicom_port=dicom_port, http_port=http_port, db_url=db_url)


def synthetic_study(directory: Path, seed: int, slices: int = 8) -> tuple[str, list[Path]]:
    """An MR series of the engine's synthetic phantom with an anomaly, as files."""
    from dicom_factory import series_from_volume
    from dicom_factory import write_files
    from worker.engine.synthetic import make_case

    case = make_case(seed, anomalous=True, shape=(slices, 32, 32), spacing=(8.0, 6.0, 6.0))
    datasets = series_from_volume(case.volume.array, spacing=(8.0, 6.0, 6.0))
    return str(datasets[0].StudyInstanceUID), write_files(datasets, directory)


def small_study(directory: Path, n_series: int = 1, per_series: int = 4, modality: str = "OT") -> tuple[str, list[Path]]:
    """A small study as files. Modality OT by default: the node's routing
    skips it (the job is created and routed, no inference to wait for)."""
    from dicom_factory import make_study, write_files

    datasets = make_study(n_series, per_series, modality=modality)
    return str(datasets[0].StudyInstanceUID), write_files(datasets, directory)


def study_row(node: ServedNode, study_uid: str) -> dict[str, Any]:
    """The node's ``studies`` row of a study (via the REST API)."""
    (row,) = [s for s in node.api("GET", "/api/v1/studies", params={"limit": 1000}).json()
              if s["study_instance_uid"] == study_uid]
    return dict(row)


def instance_rows(node: ServedNode, study_uid: str) -> list[tuple[str, str, str | None]]:
    """(SOP Instance UID, source, calling AE) of the study's instances on the node."""
    from sqlalchemy import select

    from pacs_node.db.models import Instance, Study

    with node.db.read_connection() as c:
        return [(r[0], r[1], r[2]) for r in c.execute(
            select(Instance.sop_instance_uid, Instance.source, Instance.calling_aet)
            .join(Study, Study.id == Instance.study_id).where(Study.study_instance_uid == study_uid))]
