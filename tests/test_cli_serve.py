"""The node as a newcomer runs it: `pacs-node serve` in its own process,
studies from dcmtk's storescu, job status through `pacs-node jobs list --json`,
a refused AE and a garbage STOW part, a clean SIGTERM, and a restart that
keeps everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodetest import TEST_AUTH, TEST_TOKEN, free_port, require_tool, tcp_open, token_config
from dicom_factory import make_study, to_bytes, write_files

NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


class NodeProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, dicom_port: int, http_port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", "--config", str(self.config), "serve"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=self.config.parent,
        )
        deadline = time.monotonic() + 30
        while not (tcp_open("127.0.0.1", dicom_port) and tcp_open("127.0.0.1", http_port)):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "node did not start:\n" + self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=config.parent,
    )


@pytest.fixture
def node_config(tmp_path: Path, db_url: str) -> Iterator[tuple[Path, int, int]]:
    dicom_port, http_port = free_port(), free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f"""
[dicom]
ae_title = "PACSNODE"
port = {dicom_port}
allowed_calling_aets = ["STORESCU", "ORTHANC"]

[http]
port = {http_port}
{token_config("newcomer", TEST_TOKEN, ["read", "write"])}
[storage]
root = "{tmp_path / 'storage'}"
min_free_bytes = 0

[database]
url = "{db_url}"

[queue]
# Jobs stay queued: this test checks ingest and assembly, not the worker.
start_worker = false

[study]
stable_seconds = 2
scheduler_interval_seconds = 0.2
"""
    )
    if not db_url.startswith("sqlite"):
        assert cli(cfg, "db", "upgrade").returncode == 0
    yield cfg, dicom_port, http_port


def test_serve_storescu_jobs_list_and_restart(node_config: tuple[Path, int, int], tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    echoscu = require_tool("echoscu")
    cfg, dicom_port, http_port = node_config
    node = NodeProcess(cfg, tmp_path / "node.log")
    node.start(dicom_port, http_port)
    try:
        study = make_study(n_series=3, per_series=5, modality="MR")
        files = write_files(study, tmp_path / "study")
        res = subprocess.run([storescu, "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(dicom_port),
                              *map(str, files)], capture_output=True, text=True, env=NODELAY_ENV, timeout=60)
        assert res.returncode == 0, res.stderr
        # A refused calling AE gets A-ASSOCIATE-RJ and a log line naming it.
        res = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "PACSNODE", "127.0.0.1", str(dicom_port)],
                             capture_output=True, text=True, env=NODELAY_ENV, timeout=30)
        assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stdout + res.stderr
        # A garbage STOW-RS part next to a valid one: 202 with the failure listed.
        extra = make_study(1, 1)
        body = b"".join([
            b"--XYZ\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(extra[0]) + b"\r\n",
            b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--XYZ--\r\n",
        ])
        stow = f"http://127.0.0.1:{http_port}/dicomweb/studies"
        ctype = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=XYZ'}
        assert httpx.post(stow, content=body, headers=ctype).status_code == 401  # no token, nothing stored
        r = httpx.post(stow, content=body, headers={**ctype, **TEST_AUTH})
        assert r.status_code == 202
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC210]

        # After stable_seconds, exactly one queued job per study.
        deadline = time.monotonic() + 20
        jobs: list[dict] = []
        while time.monotonic() < deadline:
            out = cli(cfg, "jobs", "list", "--json")
            assert out.returncode == 0, out.stderr
            jobs = json.loads(out.stdout)
            if len(jobs) == 2:
                break
            time.sleep(0.3)
        by_study = {j["study_instance_uid"]: j for j in jobs}
        job = by_study[study[0].StudyInstanceUID]
        assert job["state"] == "queued" and job["instance_count"] == 15 and job["series_count"] == 3
        assert job["modalities"] == ["MR"]
        time.sleep(1)
        assert len(json.loads(cli(cfg, "jobs", "list", "--json").stdout)) == 2  # still exactly one each
        shown = json.loads(cli(cfg, "jobs", "show", str(job["id"]), "--json").stdout)
        assert [e["to_state"] for e in shown["events"]] == ["received", "queued"]
        assert "INTRUDER" in (tmp_path / "node.log").read_text()
        assert node.stop() == 0  # SIGTERM stops cleanly
        assert "pacs-node stopped" in (tmp_path / "node.log").read_text()

        # Restart: everything stored and every job is still there.
        node.start(dicom_port, http_port)
        studies = json.loads(cli(cfg, "studies", "list", "--json").stdout)
        assert {s["study_instance_uid"]: s["num_instances"] for s in studies} == {
            study[0].StudyInstanceUID: 15, extra[0].StudyInstanceUID: 1}
        assert len(json.loads(cli(cfg, "jobs", "list", "--json").stdout)) == 2
        assert len(list((tmp_path / "storage").rglob("*.dcm"))) == 16
        human = cli(cfg, "jobs", "list")
        assert human.returncode == 0 and "queued" in human.stdout and "STATE" in human.stdout
    finally:
        if node.proc and node.proc.poll() is None:
            node.stop()


def test_bad_config_stops_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[dicom]\nport = 70000\n")
    res = cli(cfg, "serve")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dicom.port" in lines[0]
    cfg.write_text("[study]\nstable_seconds = -1\n")
    res = cli(cfg, "jobs", "list")
    assert res.returncode == 2 and "study.stable_seconds" in res.stderr
    cfg.write_text("[dicom]\nae_tittle = 'X'\n")
    res = cli(cfg, "serve")
    assert res.returncode == 2 and "dicom.ae_tittle: unknown key" in res.stderr
    env = {**os.environ, "PACS_NODE_DICOM__MAX_ASSOCIATIONS": "zero"}
    cfg.write_text("")
    res = subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(cfg), "jobs", "list"],
                         capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "dicom.max_associations" in res.stderr


def test_example_config_is_valid_and_complete(tmp_path: Path) -> None:
    """config.example.toml parses, validates, and documents every settings key."""
    import tomllib

    from pacs_node.config import Settings, load_settings

    example = Path(__file__).resolve().parents[1] / "config.example.toml"
    settings = load_settings(example)
    data = tomllib.loads(example.read_text())
    text = example.read_text()
    # Sections validated by the worker's own models.
    from worker.engine.settings import EngineSettings
    from worker.outputs.settings import OutputSettings
    from worker.settings import WorkerSettings

    EngineSettings.model_validate(settings.engine)
    OutputSettings.model_validate(settings.outputs)
    WorkerSettings.from_settings(settings)
    for model, section in ((EngineSettings, "engine"), (OutputSettings, "outputs"), (WorkerSettings, "worker")):
        for key in model.model_fields:
            if key == "engine":
                continue
            assert f"{key} =" in text, f"{section}.{key} undocumented"
    for key in ("name", "kind", "host", "port", "ae_title", "url", "token", "max_attempts", "backoff_seconds"):
        assert f"# {key} =" in text, f"destinations.{key} undocumented"
    for section, model in Settings.model_fields.items():
        sub = getattr(settings, section)
        if hasattr(sub, "model_fields"):
            assert section in data, f"[{section}] missing from config.example.toml"
            for key in type(sub).model_fields:
                assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} undocumented"


def test_start_up_logs_one_line_per_destination_source_and_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: the log says what the node sends to, pulls from and runs;
    credentials in a URL are not logged."""
    import logging

    from pacs_node.config import Settings
    from pacs_node.serve import log_configuration

    settings = Settings(
        destinations=[
            {"name": "pacs", "kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "tls": True},
            {"name": "web", "kind": "dicomweb", "url": "https://user:secret@127.0.0.1/dicomweb"},
        ],
        sources=[{"name": "archive", "kind": "dimse", "ae_title": "ARCH", "host": "127.0.0.1", "port": 104}],
        engine={"model": str(tmp_path / "absent.pt")},
    )
    with caplog.at_level(logging.INFO, "pacs_node.serve"):
        log_configuration(settings)
    lines = [r.getMessage() for r in caplog.records]
    assert "destination pacs (dimse ORTHANC@127.0.0.1:4242, tls)" in lines
    assert "destination web (dicomweb 127.0.0.1/dicomweb)" in lines
    assert "source archive (dimse ARCH@127.0.0.1:104)" in lines
    assert any(line.startswith("model ") and "missing" in line for line in lines)
    assert "secret" not in caplog.text


def test_read_commands_never_create_a_database_and_say_why_in_one_line(tmp_path: Path) -> None:
    """Issue 14: `pacs-node jobs list` run in a directory with no node in it
    used to create ./pacs-node-data/ and print a 60-line traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
    for command in (["jobs", "list"], ["studies", "list"], ["jobs", "show", "1"]):
        r = subprocess.run([sys.executable, "-m", "pacs_node", *command], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"no database at {tmp_path.resolve() / 'pacs-node-data' / 'pacs-node.db'}" in lines[0]
        assert "no config file found" in lines[0] and "PACS_NODE_CONFIG" in lines[0]
    assert list(tmp_path.iterdir()) == []

    # A database file with no pacs-node tables (a wrong database.url).
    os.close(os.open(tmp_path / "other.db", os.O_CREAT | os.O_WRONLY, 0o600))
    (tmp_path / "pacs-node.toml").write_text(f'[database]\nurl = "sqlite:///{tmp_path / "other.db"}"\n')
    r = subprocess.run([sys.executable, "-m", "pacs_node", "jobs", "list"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "has no pacs-node tables; run `pacs-node db upgrade`" in r.stderr
    assert "database.url from pacs-node.toml" in r.stderr  # ./pacs-node.toml is found by default
    assert not (tmp_path / "pacs-node-data").exists()
