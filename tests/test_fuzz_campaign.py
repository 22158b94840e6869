"""The fuzz campaign of issue 13: a seeded mutator (tests/fuzzing.py) sends
mutated data sets over C-STORE and as STOW-RS parts, and garbage PDUs, to
`pacs-node serve` running in its own process.

Pass means: the node never dies; every case gets a specific status (no
0x0110, no lost association, no part missing from a STOW-RS response); every
instance answered 0x0000 decodes (the node runs with the full decode check);
no ERROR record with a traceback; no file outside the storage root; the
node's resident memory stays within 100 MB of its baseline; and a legitimate
sender is still served at the end.

Reproduce a campaign with ``PACS_NODE_FUZZ_SEED=<seed>``; one case with
``fuzzing.make_case(seed, index)`` (the failure message names both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

import fuzzing
from dicom_factory import make_instance, to_bytes
from nodetest import free_port, tcp_open, token_config

SEED = int(os.environ.get("PACS_NODE_FUZZ_SEED", "20261204"))
N_DIMSE = int(os.environ.get("PACS_NODE_FUZZ_DIMSE", "1000"))
N_STOW = int(os.environ.get("PACS_NODE_FUZZ_STOW", "500"))
N_PDU = int(os.environ.get("PACS_NODE_FUZZ_PDUS", "200"))
MEMORY_BOUND_MB = 100
TOKEN = "fuzz-token-" + "7" * 32


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _Sampler(threading.Thread):
    """Peak resident memory of a process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak_kb = max(self.peak_kb, _rss_kb(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)


@pytest.fixture
def fuzz_node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int, int]]:
    home = tmp_path / "node"
    home.mkdir()
    dicom_port, http_port = free_port(), free_port()
    cfg = home / "node.toml"
    cfg.write_text(f"""
[dicom]
port = {dicom_port}
max_associations = 32

[http]
port = {http_port}
{token_config("fuzzer", TOKEN, ["read", "write"])}

[storage]
root = "{home / 'storage'}"
min_free_bytes = 0
fsync = false

[ingest]
decode_check = "full"

[database]
url = "sqlite:///{home / 'node.db'}"

[queue]
start_worker = false

[study]
# Nothing becomes a job during the campaign: this tests ingest.
stable_seconds = 3600
force_complete_seconds = 7200

[logging]
json_format = true
""")
    log = home / "node.log"
    proc = subprocess.Popen([sys.executable, "-m", "pacs_node", "--config", str(cfg), "serve"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=home)
    try:
        deadline = time.monotonic() + 60
        while not (tcp_open("127.0.0.1", dicom_port) and tcp_open("127.0.0.1", http_port)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "node did not start:\n" + log.read_text()
            time.sleep(0.1)
        yield proc, home, dicom_port, http_port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _store_valid(port: int) -> int:
    from pynetdicom import AE

    ds = make_instance(study_uid="1.2.826.0.1.3680043.10.1393.7", series_uid="1.2.826.0.1.3680043.10.1393.7.1")
    ae = AE(ae_title="LEGIT")
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status)
    finally:
        assoc.release()


def _undecodable(home: Path, sops: set[str]) -> list[str]:
    """Instances answered 0x0000 whose file does not decode completely."""
    engine = create_engine(f"sqlite:///{home / 'node.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT sop_instance_uid, path FROM instances")).all()
    engine.dispose()
    paths = {sop: path for sop, path in rows}
    bad = []
    for sop in sops:
        if sop not in paths:
            bad.append(f"{sop}: acknowledged but no row")
            continue
        try:
            ds = dcmread(home / "storage" / paths[sop])
            if "PixelData" in ds:
                ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:  # noqa: BLE001 - any failure is a finding
            bad.append(f"{sop}: {type(exc).__name__}: {str(exc)[:120]}")
    return bad


@pytest.mark.timeout(420)
def test_fuzz_campaign(fuzz_node: tuple[subprocess.Popen[bytes], Path, int, int]) -> None:
    proc, home, dicom_port, http_port = fuzz_node
    started = time.monotonic()
    # Baseline after a warm-up (imports, first association, first request).
    assert _store_valid(dicom_port) == 0x0000
    warm = fuzzing.send_stow(fuzzing.make_cases(SEED + 1, 5), f"http://127.0.0.1:{http_port}/dicomweb", token=TOKEN)
    assert all(o.status is not None for o in warm)
    time.sleep(0.5)
    baseline_kb = _rss_kb(proc.pid)
    sampler = _Sampler(proc.pid)
    sampler.start()
    report = fuzzing.CampaignReport()
    try:
        report.outcomes += fuzzing.send_dimse(fuzzing.make_cases(SEED, N_DIMSE), "127.0.0.1", dicom_port)
        assert proc.poll() is None, "node died during the C-STORE cases"
        report.outcomes += fuzzing.send_stow(fuzzing.make_cases(SEED, N_STOW, start=N_DIMSE),
                                             f"http://127.0.0.1:{http_port}/dicomweb", token=TOKEN)
        assert proc.poll() is None, "node died during the STOW-RS cases"
        report.pdus = fuzzing.send_garbage_pdus(SEED, N_PDU, "127.0.0.1", dicom_port)
        assert proc.poll() is None, "node died during the garbage PDUs"
        # A legitimate sender is still served.
        assert _store_valid(dicom_port) == 0x0000
    finally:
        sampler.stop()
    report.seconds = time.monotonic() - started
    summary = {"dimse": dict(report.counts("dimse")), "stow": dict(report.counts("stow")), "pdus": dict(report.pdus),
               "seconds": round(report.seconds, 1), "rss_growth_mb": round((sampler.peak_kb - baseline_kb) / 1024, 1)}
    print(json.dumps(summary))

    violations = report.violations()
    assert not violations, f"{len(violations)} cases without a specific status:\n" + "\n".join(violations[:20])
    stored = {o.case.sop_instance_uid for o in report.outcomes if o.status == 0}
    bad = _undecodable(home, stored)
    assert not bad, f"{len(bad)} acknowledged instances do not decode:\n" + "\n".join(bad[:20])

    records = [json.loads(line) for line in (home / "node.log").read_text().splitlines() if line.startswith("{")]
    tracebacks = [r for r in records if r["level"] in ("ERROR", "CRITICAL") and "exc" in r]
    assert not tracebacks, "ERROR records with a traceback:\n" + "\n".join(
        f"{r['logger']}: {r['message']}\n{r['exc'][-600:]}" for r in tracebacks[:5])

    storage = (home / "storage").resolve()
    outside = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                     if p.is_file() and not p.resolve().is_relative_to(storage))
    # The node's own files: config, log, database, and the demo model it
    # installs at the default [engine] model path on first start.
    allowed = {"node.toml", "node.log", "node.db", "node.db-wal", "node.db-shm", "pacs-node-data/models/demo.pt"}
    assert set(outside) <= allowed, outside
    assert not list(home.parent.glob("*.dcm")) and sorted(p.name for p in home.parent.iterdir()) == ["node"]
    leftovers = [p for p in storage.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert not leftovers, leftovers[:5]

    growth_mb = (sampler.peak_kb - baseline_kb) / 1024
    assert growth_mb <= MEMORY_BOUND_MB, f"resident memory grew by {growth_mb:.0f} MB"
