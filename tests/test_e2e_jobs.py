"""End to end through real processes: `pacs-node serve` (+ workers), dcmtk's
storescu as the PACS, dcmtk's storescp as the destination.

* embedded defaults: SQLite + embedded queue + the worker `serve` starts;
* production shape: Redis broker + PostgreSQL + two `pacs-node worker`s;
* a worker killed with SIGKILL mid-job: redelivered, completes exactly once;
* a remote-mode worker with no access to the storage directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_factory import series_from_volume, write_files
from nodetest import REDIS_URL, free_port, require, require_tool, tcp_open, token_config

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: The operator's token (read, write) and the remote worker's own, read-only token (WADO-RS).
TOKEN = "pn_e2e-operator-" + "2" * 32
WORKER_TOKEN = "pn_e2e-worker-" + "3" * 32
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

pytestmark = pytest.mark.timeout(240)


def _study_files(tmp: Path, n: int = 1, slices: int = 12) -> list[tuple[str, list[Path]]]:
    from worker.engine.synthetic import make_case

    out = []
    for i in range(n):
        case = make_case(9000 + i, anomalous=True, shape=(slices, 32, 32), spacing=(8.0, 6.0, 6.0))
        ds = series_from_volume(case.volume.array, spacing=(8.0, 6.0, 6.0))
        out.append((ds[0].StudyInstanceUID, write_files(ds, tmp / f"study{i}")))
    return out


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.p = subprocess.Popen([sys.executable, "-m", "pacs_node", *args], stdout=log.open("ab"),
                                  stderr=subprocess.STDOUT, env=env or dict(os.environ))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    exe = require_tool("storescp")
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    p = subprocess.Popen([exe, "-aet", "ARCHIVE", "-od", str(out), "+uf", str(port)], env=NODELAY_ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not tcp_open("127.0.0.1", port):
        assert time.monotonic() < deadline and p.poll() is None, "storescp did not start"
        time.sleep(0.05)
    yield port, out
    p.terminate()
    p.wait(timeout=10)


def _config(tmp: Path, *, db_url: str, broker: str, model: Path, dest_port: int, start_worker: bool,
            extra: str = "") -> tuple[Path, int, int]:
    dicom_port, http_port = free_port(), free_port()
    cfg = tmp / "node.toml"
    cfg.write_text(f"""
[dicom]
port = {dicom_port}
[http]
port = {http_port}
{token_config("operator", TOKEN, ["read", "write"])}
{token_config("worker", WORKER_TOKEN, ["read"])}[storage]
root = "{tmp / 'storage'}"
min_free_bytes = 0
[database]
url = "{db_url}"
[queue]
broker_url = "{broker}"
start_worker = {str(start_worker).lower()}
lease_seconds = 4.0
heartbeat_seconds = 1.0
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
[[destinations]]
name = "archive"
kind = "dimse"
host = "127.0.0.1"
port = {dest_port}
ae_title = "ARCHIVE"
{extra}
""")
    return cfg, dicom_port, http_port


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=60)


def _wait_port(port: int, proc: Proc) -> None:
    """Wait until the node listens on ``port`` and says it is serving (a port
    merely open could belong to another process if the node failed to bind)."""
    deadline = time.monotonic() + 30
    while not ("pacs-node serving" in proc.log.read_text() and tcp_open("127.0.0.1", port)):
        assert proc.p.poll() is None, proc.log.read_text()[-3000:]
        assert time.monotonic() < deadline, proc.log.read_text()[-3000:]
        time.sleep(0.1)


def _send(files: list[Path], port: int) -> None:
    res = subprocess.run([require_tool("storescu"), "-v", "-aet", "PACS", "-aec", "PACSNODE", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, env=NODELAY_ENV, timeout=60)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _jobs(cfg: Path) -> list[dict]:
    """Job list read straight from SQL (cheaper than a CLI process per poll)."""
    import tomllib

    from pacs_node.db.session import Database
    from pacs_node.jobs.queries import list_jobs

    db = Database(tomllib.loads(cfg.read_text())["database"]["url"])
    try:
        with db.sessionmaker() as s:
            return [j.model_dump(mode="json") for j in list_jobs(s)]
    finally:
        db.dispose()


def _wait_jobs(cfg: Path, n: int, states: set[str], logs: list[Path], timeout: float = 150) -> list[dict]:
    deadline = time.monotonic() + timeout
    jobs: list[dict] = []
    while time.monotonic() < deadline:
        jobs = _jobs(cfg)
        if len(jobs) >= n and all(j["state"] in states for j in jobs):
            return jobs
        if any(j["state"] in {"failed", "delivery_failed"} for j in jobs):
            break
        time.sleep(0.5)
    detail = [_cli(cfg, "jobs", "show", str(j["id"])).stdout for j in jobs]
    raise AssertionError(f"jobs not {states}: {jobs}\n{detail}\n" + "\n".join(p.read_text()[-4000:] for p in logs))


def _received(out: Path) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for f in out.rglob("*"):
        if f.is_file():
            ds = dcmread(f, stop_before_pixels=True)
            kinds.setdefault(str(ds.SOPClassUID), []).append(str(ds.SOPInstanceUID))
    return kinds


def test_serve_alone_takes_a_study_to_seg_and_sr(tmp_path: Path, tiny_model: Path,
                                                 storescp: tuple[int, Path]) -> None:
    """Embedded defaults: SQLite, embedded queue, the worker `serve` starts."""
    dest_port, received = storescp
    cfg, dicom_port, http_port = _config(tmp_path, db_url=f"sqlite:///{tmp_path / 'node.db'}", broker="embedded",
                                         model=tiny_model, dest_port=dest_port, start_worker=True)
    node = Proc(["--config", str(cfg), "serve"], tmp_path / "node.log")
    try:
        _wait_port(dicom_port, node)
        ((study_uid, files),) = _study_files(tmp_path)
        _send(files, dicom_port)
        (job,) = _wait_jobs(cfg, 1, {"done"}, [tmp_path / "node.log"])
        detail = json.loads(_cli(cfg, "jobs", "show", str(job["id"]), "--json").stdout)
        states = [e["to_state"] for e in detail["events"]]
        assert states[:4] == ["received", "queued", "running", "delivering"] and states[-1] == "done"
        for stage in ("queue_wait", "load", "inference", "postprocess", "build", "delivery"):
            assert stage in detail["timings"], detail["timings"]
        kinds = _received(received)
        assert len(kinds.get(SEG, [])) == 1 and len(kinds.get(COMPREHENSIVE_3D_SR, [])) == 1, kinds
        seg = dcmread(next(f for f in received.rglob("*") if f.is_file() and dcmread(f).SOPClassUID == SEG))
        assert seg.StudyInstanceUID == study_uid
        # A retry runs the job again; deterministic UIDs mean the archive gets
        # the same instances again (replaced), not new ones.
        out = _cli(cfg, "jobs", "retry", str(job["id"]), "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["state"] == "queued", out.stderr
        _wait_jobs(cfg, 1, {"done"}, [tmp_path / "node.log"])
        again = _received(received)
        assert {k: set(v) for k, v in again.items()} == {k: set(v) for k, v in kinds.items()}
        assert len(again[SEG]) == 2  # sent twice, same SOP Instance UID
        busy = _cli(cfg, "jobs", "retry", "999")
        assert busy.returncode == 1 and "not found" in busy.stderr
    finally:
        node.stop()


def test_redis_postgres_two_workers_and_sigkill(tmp_path: Path, tiny_model: Path, pg_url: str,
                                                storescp: tuple[int, Path]) -> None:
    """Production shape: Redis + PostgreSQL, two workers; one is SIGKILLed mid-job."""
    require(tcp_open("127.0.0.1", 6379), "Redis at 127.0.0.1:6379")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    dest_port, received = storescp
    cfg, dicom_port, http_port = _config(
        tmp_path, db_url=pg_url, broker=REDIS_URL, model=tiny_model, dest_port=dest_port, start_worker=False,
        extra="[worker]\npre_inference_delay_seconds = 3.0\n")
    assert _cli(cfg, "db", "upgrade").returncode == 0
    logs = [tmp_path / n for n in ("node.log", "w1.log", "w2.log")]
    node = Proc(["--config", str(cfg), "serve"], logs[0])
    w1 = Proc(["--config", str(cfg), "worker", "--queues", "gpu,io"], logs[1])
    w2 = Proc(["--config", str(cfg), "worker", "--queues", "gpu,io"], logs[2])
    try:
        _wait_port(dicom_port, node)
        studies = _study_files(tmp_path, n=2)
        for _, files in studies:
            _send(files, dicom_port)
        # Both workers pick one job each; kill one while its job is running.
        deadline = time.monotonic() + 60
        running: list[dict] = []
        while time.monotonic() < deadline:
            jobs = _jobs(cfg)
            running = [j for j in jobs if j["state"] == "running"]
            if len(running) == 2:
                break
            time.sleep(0.2)
        assert len(running) == 2, jobs
        victim = json.loads(_cli(cfg, "jobs", "show", str(running[0]["id"]), "--json").stdout)["worker_host"]
        pid = int(victim.rsplit("/", 1)[1])
        os.kill(pid, signal.SIGKILL)  # the pool process running the job
        jobs = _wait_jobs(cfg, 2, {"done"}, logs)
        hosts = {json.loads(_cli(cfg, "jobs", "show", str(j["id"]), "--json").stdout)["worker_host"] for j in jobs}
        killed = json.loads(_cli(cfg, "jobs", "show", str(running[0]["id"]), "--json").stdout)
        assert killed["attempts"] == 2 and any("lost" in (e["message"] or "") for e in killed["events"])
        assert len(hosts) >= 1
        kinds = _received(received)
        # Exactly once at the destination: one SEG and one SR per study.
        assert sorted(len(v) for v in kinds.values()) == [2, 2], kinds
        assert all(len(set(v)) == len(v) for v in kinds.values())
    finally:
        for p in (w1, w2, node):
            p.stop()


def test_remote_worker_without_shared_storage(tmp_path: Path, tiny_model: Path, pg_url: str,
                                              storescp: tuple[int, Path]) -> None:
    """A worker that cannot see the storage directory fetches over WADO-RS."""
    require(tcp_open("127.0.0.1", 6379), "Redis at 127.0.0.1:6379")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    dest_port, received = storescp
    node_dir, worker_dir = tmp_path / "node", tmp_path / "worker"
    node_dir.mkdir()
    worker_dir.mkdir()
    cfg, dicom_port, http_port = _config(node_dir, db_url=pg_url, broker=REDIS_URL, model=tiny_model,
                                         dest_port=dest_port, start_worker=False)
    assert _cli(cfg, "db", "upgrade").returncode == 0
    wcfg = worker_dir / "worker.toml"
    text = cfg.read_text().replace(str(node_dir / "storage"), str(worker_dir / "no-such-storage"))
    wcfg.write_text(text + f'\n[worker]\nstorage = "remote"\nnode_url = "http://127.0.0.1:{http_port}"\n'
                    f'node_token = "{WORKER_TOKEN}"\noutputs_dir = "{worker_dir / "outputs"}"\n')
    logs = [node_dir / "node.log", worker_dir / "w.log"]
    node = Proc(["--config", str(cfg), "serve"], logs[0])
    w = Proc(["--config", str(wcfg), "worker", "--queues", "gpu,io"], logs[1])
    try:
        _wait_port(dicom_port, node)
        ((study_uid, files),) = _study_files(tmp_path)
        _send(files, dicom_port)
        _wait_jobs(cfg, 1, {"done"}, logs)
        assert not (worker_dir / "no-such-storage").exists()
        kinds = _received(received)
        assert len(kinds.get(SEG, [])) == 1 and len(kinds.get(COMPREHENSIVE_3D_SR, [])) == 1
        assert "WADO-RS" in logs[1].read_text() or "fetched" in logs[1].read_text()
    finally:
        w.stop()
        node.stop()


def test_serve_demo_model_on_a_template_normal_head(tmp_path: Path, storescp: tuple[int, Path]) -> None:
    """The shipped demo model, through `pacs-node serve`, on a normal head generated from the MNI
    template (a held-out seed): the SEG's findings stay inside the normal false-positive budget."""
    from pacs_node.serve import BUNDLED_DEMO_MODEL
    from worker.engine.anatomy import SubjectConfig, make_subject
    from worker.engine.headdemo import SEEDS

    subject = make_subject(SEEDS["test_normal"] + 11, SubjectConfig(inplane_spacing=(1.1, 1.2), partial_coverage=0.0))
    sp = subject.volume.spacing
    ds = series_from_volume(subject.volume.array, spacing=sp)
    files = write_files(ds, tmp_path / "head")
    dest_port, received = storescp
    cfg, dicom_port, _ = _config(tmp_path, db_url=f"sqlite:///{tmp_path / 'node.db'}", broker="embedded",
                                 model=BUNDLED_DEMO_MODEL, dest_port=dest_port, start_worker=True)
    node = Proc(["--config", str(cfg), "serve"], tmp_path / "node.log")
    try:
        _wait_port(dicom_port, node)
        _send(files, dicom_port)
        (job,) = _wait_jobs(cfg, 1, {"done"}, [tmp_path / "node.log"], timeout=200)
        detail = json.loads(_cli(cfg, "jobs", "show", str(job["id"]), "--json").stdout)
        findings = detail["findings"]
        total_ml = sum(f["volume_mm3"] for f in findings["items"]) / 1000.0
        assert total_ml <= NORMAL_BUDGET_ML, findings
        assert findings["domain"]["in_domain"], findings["domain"]
        seg_files = [f for f in received.rglob("*") if f.is_file() and dcmread(f, stop_before_pixels=True).SOPClassUID == SEG]
        assert len(seg_files) == 1
        seg = dcmread(seg_files[0])
        voxels = int(seg.pixel_array.astype(bool).sum()) if "PixelData" in seg else 0
        assert voxels * float(sp[0] * sp[1] * sp[2]) / 1000.0 == pytest.approx(total_ml, abs=0.01)
    finally:
        node.stop()


#: the issue-12 target for a normal study: median false-positive volume at most 1 mL
NORMAL_BUDGET_ML = 1.0
