"""The attacks of issue 13 against `pacs-node serve`, one after another, each
with the node's resident-memory growth and whether a legitimate sender is
served at the same time; then the fuzz campaign's counts by status.

    python benchmarks/bench_attacks.py [--fuzz-seed 20261204] [--fuzz-cases 1000] [--publish]

Attacks (the attacker connects from 127.0.0.2, the legitimate sender from
127.0.0.1, so per-address limits are exercised as on a hospital network):

* deflate bomb: a deflated data set of ~400 KiB whose private element
  inflates to 400 MiB, over C-STORE and as a STOW-RS part;
* a 4 GiB A-ASSOCIATE-RQ declared, then 600 MiB streamed;
* an instance larger than the node's maximum (256 MiB sent, 64 MiB allowed);
* 16 idle TCP connections, and the same attacker reconnecting in a loop;
* 16 idle associations;
* STOW-RS: Content-Length larger than the body; 100,000 one-byte parts;
* the fuzz campaign of tests/test_fuzz_campaign.py (the same mutator,
  tests/fuzzing.py, imported from there: one implementation of the cases).

Writes ``benchmarks/out/attacks.json``; ``--publish`` copies it to
``benchmarks/results/``. docs/reliability.md quotes the published file.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx  # noqa: E402

import fuzzing  # noqa: E402 - the campaign's mutator (tests/fuzzing.py)
from common import RESULTS_DIR, log, machine_info, node, write_json  # noqa: E402
from dicom_factory import make_instance  # noqa: E402

ATTACKER = "127.0.0.2"
TOKEN = "bench-" + "5" * 40
MAX_INSTANCE_MIB = 64


def _token_toml() -> str:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    return f'[[http.tokens]]\nname = "bench"\nsha256 = "{digest}"\nscopes = ["read", "write"]\n'


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.base, self.peak, self.done = pid, _rss_kb(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _rss_kb(self.pid))
            time.sleep(0.02)

    def growth_mb(self) -> float:
        self.done.set()
        self.join(2)
        return round(max(0, self.peak - self.base) / 1024, 1)


def legit_store(port: int, timeout: float = 30.0) -> dict[str, Any]:
    """One C-STORE from 127.0.0.1 as a real archive would send it."""
    from pynetdicom import AE

    ds = make_instance(study_uid=fuzzing.generate_uid(), series_uid=fuzzing.generate_uid())
    ae = AE(ae_title="LEGIT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    t0 = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    if not assoc.is_established:
        return {"ok": False, "seconds": round(time.monotonic() - t0, 2), "why": "association refused"}
    try:
        rsp = assoc.send_c_store(ds)
        ok = rsp is not None and int(rsp.get("Status", -1)) == 0
    finally:
        assoc.release()
    return {"ok": ok, "seconds": round(time.monotonic() - t0, 2)}


def while_attacking(pid: int, port: int, attack: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``attack`` in a thread; a legitimate store starts one second in."""
    peak = Peak(pid)
    peak.start()
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(attack()), daemon=True)
    t.start()
    time.sleep(1.0)
    legit = legit_store(port)
    t.join(timeout=300)
    return {**result, "legit_sender": legit, "rss_growth_mb": peak.growth_mb()}


# ---------------------------------------------------------------- attacks
def bomb_dimse(port: int) -> dict[str, Any]:
    body = fuzzing.deflate_bomb(400)
    case = fuzzing.Case(0, 0, "bomb", "ct-deflated", fuzzing.bases()[2].sop_class_uid, fuzzing.generate_uid(),
                        fuzzing.DEFLATED, body)
    out = fuzzing.send_dimse([case], "127.0.0.1", port)[0]
    return {"sent_kib": len(body) // 1024, "status": None if out.status is None else f"0x{out.status:04X}",
            "comment": out.note}


def bomb_stow(http: int) -> dict[str, Any]:
    body = fuzzing.deflate_bomb(400)
    case = fuzzing.Case(0, 1, "bomb", "ct-deflated", fuzzing.bases()[2].sop_class_uid, fuzzing.generate_uid(),
                        fuzzing.DEFLATED, body)
    out = fuzzing.send_stow([case], f"http://127.0.0.1:{http}/dicomweb", token=TOKEN)[0]
    return {"sent_kib": len(body) // 1024, "failure_reason": None if out.status is None else f"0x{out.status:04X}",
            "note": out.note}


def huge_associate_rq(port: int, stream_mib: int = 600) -> dict[str, Any]:
    sent = 0
    t0 = time.monotonic()
    outcome = "all sent"
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(ATTACKER, 0)) as s:
        s.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF))
        chunk = b"\x00" * (1 << 20)
        try:
            for _ in range(stream_mib):
                s.sendall(chunk)
                sent += 1
        except OSError as exc:
            outcome = f"cut off by the node ({type(exc).__name__})"
    return {"declared_gib": 4, "sent_mib_before_cut": sent, "outcome": outcome,
            "seconds": round(time.monotonic() - t0, 2)}


def oversize_instance(port: int, mib: int = 256) -> dict[str, Any]:
    base = fuzzing.bases()[0]
    els = [(t, r) for t, r in base.elements if t != 0x7FE00010]
    pixel = fuzzing.raw_element(0x7FE00010, b"OW", b"\x00" * (mib << 20))
    case = fuzzing.Case(0, 2, "oversize", base.name, base.sop_class_uid, fuzzing.generate_uid(), base.transfer_syntax_uid,
                        b"".join(r for _, r in els) + pixel)
    t0 = time.monotonic()
    out = fuzzing.send_dimse([case], "127.0.0.1", port)[0]
    return {"sent_mib": mib, "limit_mib": MAX_INSTANCE_MIB,
            "status": None if out.status is None else f"0x{out.status:04X}", "note": out.note[:120],
            "seconds": round(time.monotonic() - t0, 2)}


def idle_tcp(port: int, n: int = 16, hold: float = 12.0, reconnect: bool = False) -> dict[str, Any]:
    """Open n connections from the attacker address that send nothing; with
    ``reconnect`` reopen each one as soon as the node closes it."""
    socks: list[socket.socket] = []
    closed_after: list[float] = []
    refused = 0
    t0 = time.monotonic()

    def connect() -> socket.socket | None:
        nonlocal refused
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(ATTACKER, 0))
            s.setblocking(False)
            return s
        except OSError:
            refused += 1
            return None

    for _ in range(n):
        s = connect()
        if s is not None:
            socks.append(s)
    opened = time.monotonic()
    while time.monotonic() - t0 < hold:
        for i, s in enumerate(list(socks)):
            try:
                if s.recv(1) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                continue
            except OSError:
                pass
            closed_after.append(time.monotonic() - opened)
            s.close()
            socks.remove(s)
            if reconnect:
                r = connect()
                if r is not None:
                    socks.append(r)
        time.sleep(0.05)
    for s in socks:
        s.close()
    return {"connections": n, "reconnect_loop": reconnect, "closed_by_node": len(closed_after),
            "closed_after_s_max": round(max(closed_after), 2) if closed_after else None,
            "connects_refused": refused}


def idle_associations(port: int, n: int = 16, hold: float = 12.0) -> dict[str, Any]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="IDLER")
    ae.add_requested_context(Verification)
    assocs = []
    refused = 0
    for _ in range(n):
        a = ae.associate("127.0.0.1", port, ae_title="PACSNODE", bind_address=(ATTACKER, 0))
        if a.is_established:
            assocs.append(a)
        else:
            refused += 1
    time.sleep(hold)
    still = sum(1 for a in assocs if a.is_established)
    for a in assocs:
        if a.is_established:
            a.abort()
    return {"associations": n, "established": len(assocs), "refused": refused, "still_open_after_s": hold,
            "still_open": still}


def stow_short_body(http: int) -> dict[str, Any]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", http), timeout=180, source_address=(ATTACKER, 0)) as s:
        s.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                   'Content-Type: multipart/related; type="application/dicom"; boundary=B\r\n'
                   "Content-Length: 10485760\r\n\r\n--B\r\nContent-Type: application/dicom\r\n\r\n").encode())
        try:
            reply = s.recv(200)
        except TimeoutError:
            reply = b""
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace") if reply else "no answer within 180 s"
    return {"declared_mib": 10, "sent_bytes": 64, "answer": status, "seconds": round(time.monotonic() - t0, 2)}


def stow_tiny_parts(pid: int, http: int, parts: int = 100_000) -> dict[str, Any]:
    body = b"".join(b"--B\r\nContent-Type: application/dicom\r\n\r\nx\r\n" for _ in range(parts)) + b"--B--\r\n"
    cpu0, t0 = _cpu_s(pid), time.monotonic()
    r = httpx.post(f"http://127.0.0.1:{http}/dicomweb/studies", content=body, timeout=300,
                   headers={"Authorization": f"Bearer {TOKEN}",
                            "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
    return {"parts": parts, "body_mib": round(len(body) / 2**20, 1), "http": r.status_code,
            "detail": r.text[:160], "node_cpu_s": round(_cpu_s(pid) - cpu0, 2),
            "seconds": round(time.monotonic() - t0, 2)}


def fuzz(port: int, http: int, seed: int, cases: int) -> dict[str, Any]:
    t0 = time.monotonic()
    report = fuzzing.CampaignReport()
    report.outcomes += fuzzing.send_dimse(fuzzing.make_cases(seed, cases), "127.0.0.1", port)
    report.outcomes += fuzzing.send_stow(fuzzing.make_cases(seed, cases // 2, start=cases),
                                         f"http://127.0.0.1:{http}/dicomweb", token=TOKEN)
    report.pdus = fuzzing.send_garbage_pdus(seed, cases // 5, "127.0.0.1", port)
    return {"seed": seed, "dimse_cases": cases, "stow_parts": cases // 2, "garbage_pdus": cases // 5,
            "dimse": dict(sorted(report.counts("dimse").items())), "stow": dict(sorted(report.counts("stow").items())),
            "pdus": dict(sorted(report.pdus.items())), "violations": len(report.violations()),
            "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fuzz-seed", type=int, default=20261204)
    ap.add_argument("--fuzz-cases", type=int, default=1000)
    ap.add_argument("--publish", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": machine_info()}
    work = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    extra = _token_toml() + '[ingest]\ndecode_check = "full"\n'
    env = {"PACS_NODE_DICOM__MAX_INSTANCE_BYTES": str(MAX_INSTANCE_MIB << 20)}
    try:
        with node(work / "node", fsync=False, extra=extra, env=env, log_level="WARNING") as n:
            pid, port, http = n.process.pid, n.dicom_port, n.http_port
            legit_store(port)
            steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                ("deflate_bomb_dimse", lambda: bomb_dimse(port)),
                ("deflate_bomb_stow", lambda: bomb_stow(http)),
                ("huge_associate_rq", lambda: huge_associate_rq(port)),
                ("oversize_instance", lambda: oversize_instance(port)),
                ("idle_tcp_16", lambda: idle_tcp(port)),
                ("idle_tcp_16_reconnecting", lambda: idle_tcp(port, reconnect=True)),
                ("idle_associations_16", lambda: idle_associations(port)),
                ("stow_short_body", lambda: stow_short_body(http)),
                ("stow_100k_tiny_parts", lambda: stow_tiny_parts(pid, http)),
            ]
            for name, attack in steps:
                log(f"attack: {name}")
                results[name] = while_attacking(pid, port, attack)
                results[name]["node_alive"] = n.process.poll() is None
                log(f"  {results[name]}")
            log("fuzz campaign")
            peak = Peak(pid)
            peak.start()
            results["fuzz"] = fuzz(port, http, args.fuzz_seed, args.fuzz_cases)
            results["fuzz"]["rss_growth_mb"] = peak.growth_mb()
            results["fuzz"]["node_alive"] = n.process.poll() is None
            results["fuzz"]["legit_sender_after"] = legit_store(port)
            log(f"  {results['fuzz']}")
            results["node_log_tracebacks"] = n.log.read_text(errors="replace").count("Traceback")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = write_json("attacks.json", results)
    log(f"wrote {out}")
    if args.publish:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, RESULTS_DIR / "attacks.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
