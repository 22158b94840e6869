"""``pacs-node serve``: DIMSE SCP + HTTP API + study assembler in one process.

Stopping (SIGTERM / Ctrl-C): uvicorn stops taking requests, the SCP stops
accepting associations and waits for running ones, the assembler finishes its
tick. Nothing acknowledged is lost: an instance is answered with success only
after its file and row are durable.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import uvicorn

from pacs_node.api.app import create_app
from pacs_node.assemble.scheduler import StudyAssembler
from pacs_node.config import Settings
from pacs_node.ingest.dimse import DimseServer
from pacs_node.node import Node

__all__ = ["NodeServer", "serve"]

logger = logging.getLogger(__name__)


class NodeServer:
    """All long-running services of the node, startable from tests.

    Parameters
    ----------
    node:
        The assembled node.
    on_job_created:
        Hook called with each new job id after commit.
    """

    def __init__(self, node: Node, *, on_job_created: Callable[[int], None] | None = None) -> None:
        self.node = node
        self.dimse = DimseServer(node.settings.dicom, node.ingestor)
        self.assembler = StudyAssembler(node.db, node.settings.study, on_job_created=on_job_created)
        self.app = create_app(node)
        self._stop = threading.Event()
        self._assembler_thread: threading.Thread | None = None
        http = node.settings.http
        self.http = uvicorn.Server(
            uvicorn.Config(self.app, host=http.host, port=http.port, log_config=None, access_log=False)
        )
        self._http_thread: threading.Thread | None = None

    @property
    def http_port(self) -> int:
        servers = getattr(self.http, "servers", [])
        for srv in servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return self.node.settings.http.port

    def start_background(self) -> None:
        """Start everything in threads (tests); :meth:`stop` ends them."""
        self.dimse.start()
        self._start_assembler()
        self._http_thread = threading.Thread(target=self.http.run, name="http", daemon=True)
        self._http_thread.start()
        while not self.http.started:
            if not self._http_thread.is_alive():
                raise RuntimeError("HTTP server failed to start")
            threading.Event().wait(0.02)

    def _start_assembler(self) -> None:
        self._assembler_thread = threading.Thread(
            target=self.assembler.run, args=(self._stop,), name="assembler", daemon=True
        )
        self._assembler_thread.start()

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then stop everything cleanly."""
        shutdown = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            logger.info("received %s, shutting down", signal.Signals(signum).name)
            shutdown.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start_background()
            logger.info(
                "pacs-node serving: DICOM %s@%s:%d, HTTP http://%s:%d",
                self.node.settings.dicom.ae_title,
                self.node.settings.dicom.host,
                self.dimse.port,
                self.node.settings.http.host,
                self.http_port,
            )
            while not shutdown.wait(0.5):
                if self._http_thread is not None and not self._http_thread.is_alive():
                    logger.error("HTTP server stopped unexpectedly")
                    break
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.http.should_exit = True
        self.dimse.stop()
        self._stop.set()
        if self._assembler_thread is not None:
            self._assembler_thread.join(timeout=30)
        if self._http_thread is not None:
            self._http_thread.join(timeout=30)
        logger.info("pacs-node stopped")


def serve(settings: Settings) -> int:
    node = Node.from_settings(settings)
    try:
        NodeServer(node).run_forever()
    finally:
        node.close()
    return 0
