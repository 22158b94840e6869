"""Diagnostic: the pynetdicom receive floor on this machine. A pynetdicom
C-STORE SCP (the node's AE set-up: all storage contexts, TCP_NODELAY) whose
handler answers 0x0000 at once without storing, fed by dcmtk storescu.

    python benchmarks/pynetdicom_floor.py [--n 300] [--reps 3] [--active-poll-ms MS]
    python benchmarks/pynetdicom_floor.py --idle 4 [--active-poll-ms MS | --loop-delay S]

``--idle S`` instead opens one association (pynetdicom SCU, one C-ECHO),
waits past the adaptive-polling window and prints this process's CPU use
over S seconds while the association stays open and idle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DIR, free_port, make_ct_series, median, send_parallel


def idle_cpu(port: int, ae_title: str, seconds: float) -> float:
    """CPU share of this process while one association is open and idle (see the module docstring)."""
    import os
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from pacs_node.ingest import polling

    scu = AE(ae_title="FLOOR")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        assoc.send_c_echo()
        time.sleep(polling.ACTIVE_WINDOW + 0.2)
        t0, w0 = os.times(), time.perf_counter()
        time.sleep(seconds)
        t1, w1 = os.times(), time.perf_counter()
    finally:
        assoc.release()
    return ((t1.user - t0.user) + (t1.system - t0.system)) / (w1 - w0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loop-delay", type=float, default=None,
                    help="set the DUL reactor's poll sleep (s) for the whole association (no adaptive polling)")
    ap.add_argument("--active-poll-ms", type=float, default=None,
                    help="the node's [dicom] active_poll_ms (default: the node's default; 0 = pynetdicom's 1 ms)")
    ap.add_argument("--assocs", type=int, default=1)
    ap.add_argument("--idle", type=float, default=None, metavar="S",
                    help="measure the CPU of an open, idle association over S seconds instead")
    ap.add_argument("--encode", action="store_true", help="also call event.encoded_dataset(include_meta=True)")
    args = ap.parse_args()
    from pynetdicom import evt

    from pacs_node.config import DicomSettings
    from pacs_node.ingest.dimse import DimseServer, handle_conn_open

    files = make_ct_series(500, OUT_DIR / "data" / "ct512-500")[: args.n]

    def handle(event: evt.Event) -> int:
        if args.encode:
            event.encoded_dataset(include_meta=True)
        return 0x0000

    settings = DicomSettings(port=free_port())
    if args.active_poll_ms is not None or args.loop_delay is not None:
        settings = settings.model_copy(update={"active_poll_ms": 0.0 if args.loop_delay is not None
                                               else args.active_poll_ms})

    def on_open(event: evt.Event) -> None:
        handle_conn_open(event, settings)
        if args.loop_delay is not None:
            event.assoc.dul._run_loop_delay = args.loop_delay

    server = DimseServer(settings, ingestor=None)  # type: ignore[arg-type]
    srv = server.ae.start_server(("127.0.0.1", server.settings.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, handle), (evt.EVT_CONN_OPEN, on_open)])
    if args.idle is not None:
        try:
            cpu_share = idle_cpu(server.settings.port, server.settings.ae_title, args.idle)
        finally:
            srv.shutdown()
        print(json.dumps({"idle_association_cpu_percent_of_a_core": round(100 * cpu_share, 1),
                          "seconds": args.idle, "active_poll_ms": settings.active_poll_ms,
                          "loop_delay": args.loop_delay}))
        return 0
    try:
        import os

        rates, cpu = [], []
        for _ in range(args.reps):
            t0 = os.times()
            r = send_parallel(files, server.settings.port, aec="PACSNODE", associations=args.assocs)
            t1 = os.times()
            assert r.returncode == 0, r.stderr
            rates.append(r.n / r.seconds)
            cpu.append(1000 * ((t1.user - t0.user) + (t1.system - t0.system)) / r.n)
    finally:
        srv.shutdown()
    print(json.dumps({"pynetdicom_noop_images_per_s": round(median(rates), 1), "per_rep": [round(x, 1) for x in rates],
                      "ms_per_instance": round(1000 / median(rates), 2),
                      "cpu_ms_per_instance": round(median(cpu), 2), "assocs": args.assocs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
