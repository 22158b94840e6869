"""``pacs-node serve``: DIMSE SCP + HTTP API + study assembler + job
supervisor in one process, plus (by default) a local worker process fed by
the embedded queue.

Stopping (SIGTERM / Ctrl-C): the SCP stops accepting associations and waits
for running ones, uvicorn stops, the service loop finishes its tick, the
worker gets SIGTERM (Celery's warm shutdown). Nothing acknowledged is lost:
an instance is answered with success only after its file and row are
durable, and a job interrupted in a worker is queued again by its lease.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from pacs_node.api.app import create_app
from pacs_node.assemble.scheduler import CompletenessResult, StudyAssembler
from pacs_node.config import ConfigError, HttpSettings, Settings
from pacs_node.db.models import Study
from pacs_node.ingest.dimse import DimseServer
from pacs_node.ingest.reconcile import StartupReconciler
from pacs_node.jobs.actions import enqueue
from pacs_node.jobs.routing import parse_rules
from pacs_node.jobs.supervisor import JobSupervisor
from pacs_node.node import Node
from pacs_node.pull.completeness import CompletenessChecker
from pacs_node.pull.service import PullService
from pacs_node.queue import CeleryDispatcher, Dispatcher

__all__ = ["NodeServer", "WorkerProcess", "check_http_exposure", "http_tls_options", "is_loopback_host", "serve"]

logger = logging.getLogger(__name__)


class WorkerProcess:
    """A ``pacs-node worker`` child process, restarted if it dies.

    Parameters
    ----------
    config_file:
        Passed to the child with ``--config`` (None: the child reads the
        same defaults and environment as the parent).
    queues:
        Queues the child consumes.
    """

    def __init__(self, config_file: str | None, queues: str = "gpu,io", log_file: Path | None = None) -> None:
        self.config_file = config_file
        self.queues = queues
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._restarts = 0
        self._next_start = 0.0

    def start(self) -> None:
        cmd = [sys.executable, "-m", "pacs_node"]
        if self.config_file:
            cmd += ["--config", os.path.abspath(self.config_file)]
        cmd += ["worker", "--queues", self.queues]
        out = self.log_file.open("ab") if self.log_file else None
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)
        logger.info("worker process %d started (queues %s)", self.proc.pid, self.queues)

    def check(self) -> None:
        """Restart the worker (with back-off) if it exited."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if now < self._next_start:
            return
        logger.error("worker process exited with %s; restarting", self.proc.returncode)
        self._restarts += 1
        self._next_start = now + min(60.0, 2.0 ** min(self._restarts, 6))
        self.start()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("worker did not stop in %.0f s; killing it (its job will be re-queued)", timeout)
            self.proc.kill()
            self.proc.wait()


class NodeServer:
    """All long-running services of the node, startable from tests.

    Parameters
    ----------
    node:
        The assembled node.
    dispatcher:
        Enqueues tasks (default: Celery on the configured broker).
    worker:
        A local worker process to run alongside (``serve`` with the
        embedded defaults); None when workers run elsewhere.

    Raises
    ------
    ConfigError
        When ``[[sources]]`` is invalid, or the HTTPS certificate / key
        cannot be loaded.
    """

    def __init__(self, node: Node, *, dispatcher: Dispatcher | None = None,
                 worker: WorkerProcess | None = None) -> None:
        self.node = node
        try:
            # Pull mode (API analyze with a source) and the archive completeness check.
            self.pulls = PullService(node)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.completeness = CompletenessChecker(node.db, self.pulls.sources, node.settings.study.stable_seconds)
        self.dispatcher: Dispatcher = dispatcher or CeleryDispatcher(node.settings)
        self.worker = worker
        self.dimse = DimseServer(node.settings.dicom, node.ingestor)
        self.reconciler = StartupReconciler(node)
        self.assembler = StudyAssembler(
            node.db,
            node.settings.study,
            on_job_created=self._enqueue,
            rules=parse_rules(node.settings.routing),
            completeness=self._completeness,
        )
        self.supervisor = JobSupervisor(node.db, self.dispatcher)
        self.app = create_app(node, dispatcher=self.dispatcher)
        self.app.state.pulls = self.pulls
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        http = node.settings.http
        self.http = uvicorn.Server(
            uvicorn.Config(self.app, host=http.host, port=http.port, log_config=None, access_log=False,
                           forwarded_allow_ips=http.forwarded_allow_ips, **http_tls_options(http))
        )
        self._http_thread: threading.Thread | None = None

    def _enqueue(self, job_id: int) -> None:
        enqueue(self.node.db, self.dispatcher, job_id)

    def _completeness(self, study: Study) -> CompletenessResult:
        """Assembler gate: leave studies being pulled to their pull; check
        pushed studies against their source archive when configured."""
        if self.pulls.is_pulling(study.study_instance_uid):
            return CompletenessResult(False)
        if self.completeness.active:
            return self.completeness(study)
        return CompletenessResult(True)

    @property
    def http_port(self) -> int:
        for srv in getattr(self.http, "servers", []):
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return self.node.settings.http.port

    def tick(self) -> None:
        """One pass of the service loop: assemble studies, supervise jobs."""
        self.assembler.tick()
        self.supervisor.tick()
        if self.worker is not None:
            self.worker.check()

    def _loop(self) -> None:
        logger.info("service loop running (studies stable after %g s)", self.node.settings.study.stable_seconds)
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep the loop alive; the database may come back
                logger.exception("service loop tick failed")
            # scheduler_interval_seconds, or less when a study becomes due sooner
            self._stop.wait(self.assembler.wait_seconds())

    def start_background(self) -> None:
        """Start everything in threads (tests); :meth:`stop` ends them."""
        # Arrivals cut by the previous process, leftover and row-less files:
        # settled before the SCP accepts anything (pacs_node.ingest.reconcile).
        self.reconciler.run()
        self.dimse.start()
        if self.worker is not None:
            self.worker.start()
        self._loop_thread = threading.Thread(target=self._loop, name="services", daemon=True)
        self._loop_thread.start()
        self._http_thread = threading.Thread(target=self.http.run, name="http", daemon=True)
        self._http_thread.start()
        while not self.http.started:
            if not self._http_thread.is_alive():
                raise RuntimeError("HTTP server failed to start")
            time.sleep(0.02)

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then stop everything cleanly."""
        shutdown = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            logger.info("received %s, shutting down", signal.Signals(signum).name)
            shutdown.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start_background()
            s = self.node.settings
            if not self.dimse.tls:
                dicom = f"{self.dimse.port}"
            elif s.dicom.tls_port is None:
                dicom = f"{self.dimse.port} (TLS only)"
            else:
                dicom = f"{self.dimse.port}, TLS {self.dimse.tls_port}"
            logger.info(
                "pacs-node serving: DICOM %s@%s:%s, HTTP %s://%s:%d",
                s.dicom.ae_title, s.dicom.host, dicom, "https" if s.http.tls_cert else "http",
                s.http.host, self.http_port,
            )
            log_configuration(s)
            while not shutdown.wait(0.5):
                if self._http_thread is not None and not self._http_thread.is_alive():
                    logger.error("HTTP server stopped unexpectedly")
                    break
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.reconciler.stop()
        self.dimse.stop()
        self.http.should_exit = True
        self._stop.set()
        for t in (self._loop_thread, self._http_thread):
            if t is not None:
                t.join(timeout=30)
        if self.worker is not None:
            self.worker.stop()
        self.completeness.close()
        logger.info("pacs-node stopped")


#: The engine's default model path (``[engine] model``).
DEFAULT_MODEL = Path("./pacs-node-data/models/demo.pt")
#: The demo model shipped with the project (trained on heads generated from the
#: MNI ICBM152 template by ``pacs-node train --anatomy``; see docs/benchmarks.md).
BUNDLED_DEMO_MODEL = Path(__file__).resolve().parent / "data" / "demo-model.pt"


def provision_demo_model(settings: Settings) -> Path | None:
    """Install the bundled demo model at the default model path on first start.

    Only when ``[engine] model`` is left at its default and no file is there:
    an operator's own model is never replaced. Returns the installed path.
    """
    configured = Path(str(settings.engine.get("model", DEFAULT_MODEL)))
    if configured != DEFAULT_MODEL or configured.exists() or not BUNDLED_DEMO_MODEL.is_file():
        return None
    configured.parent.mkdir(parents=True, exist_ok=True)
    tmp = configured.with_suffix(".pt.tmp")
    shutil.copyfile(BUNDLED_DEMO_MODEL, tmp)
    os.replace(tmp, configured)
    logger.info("installed the bundled demo model (synthetic data, NOT FOR CLINICAL USE) at %s", configured)
    return configured


def _peer_text(entry: dict[str, Any]) -> str:
    """Where a ``[[destinations]]`` / ``[[sources]]`` entry points, without secrets."""
    kind = str(entry.get("kind", "dimse"))
    if entry.get("url"):
        where = str(entry["url"]).split("@")[-1]  # never a user:password@ part
    else:
        where = f"{entry.get('ae_title', '?')}@{entry.get('host', '?')}:{entry.get('port', '?')}"
    extras = [k for k in ("tls", "storage_commitment") if entry.get(k) not in (None, False, "false")]
    return f"{entry.get('name', '?')} ({kind} {where}{', ' + ', '.join(extras) if extras else ''})"


def log_configuration(settings: Settings) -> None:
    """One start-up line per destination, source and model, so the log says
    what this node will send to, pull from and run."""
    for entry in settings.destinations:
        logger.info("destination %s", _peer_text(entry))
    if not settings.destinations:
        logger.info("no [[destinations]]: results stay on the node")
    for entry in settings.sources:
        logger.info("source %s", _peer_text(entry))
    model = Path(str(settings.engine.get("model", DEFAULT_MODEL))).expanduser()
    logger.info("model %s%s", model, "" if model.is_file() else " (missing: jobs will fail until it exists)")
    profiles = settings.worker.get("profiles") or {}
    for name, path in dict(profiles).items():
        logger.info("model profile %s: %s", name, path)


def is_loopback_host(host: str) -> bool:
    """True when ``host`` names only the loopback interface.

    Parameters
    ----------
    host:
        An address or ``localhost``; any other name (and ``""``, all
        interfaces) counts as reachable from the network.

    Returns
    -------
    bool
        Whether only local processes can connect.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_tls_options(http: HttpSettings) -> dict[str, Any]:
    """uvicorn's TLS arguments for ``[http] tls_cert``, ``tls_key``, ``tls_ca``.

    The certificate and key are loaded once here, so a bad file is a one-line
    configuration error at start rather than a dead HTTP thread.

    Parameters
    ----------
    http:
        The ``[http]`` settings.

    Returns
    -------
    dict
        ``ssl_certfile``, ``ssl_keyfile`` and, with ``tls_ca``,
        ``ssl_ca_certs`` and ``ssl_cert_reqs=CERT_REQUIRED``; empty without TLS.

    Raises
    ------
    ConfigError
        When the certificate, key or CA file cannot be loaded.
    """
    if http.tls_cert is None:
        return {}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(http.tls_cert), str(http.tls_key) if http.tls_key else None)
        if http.tls_ca is not None:
            ctx.load_verify_locations(str(http.tls_ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"invalid configuration: http.tls_cert/tls_key/tls_ca: cannot load ({exc})") from None
    options: dict[str, Any] = {"ssl_certfile": str(http.tls_cert), "ssl_keyfile": str(http.tls_key)}
    if http.tls_ca is not None:
        options.update(ssl_ca_certs=str(http.tls_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def check_http_exposure(settings: Settings) -> None:
    """Refuse an HTTP server reachable from the network without tokens (like
    Orthanc's ``RemoteAccessAllowed`` / ``AuthenticationEnabled``), and warn
    about the settings that weaken authentication.

    Parameters
    ----------
    settings:
        The node's settings.

    Raises
    ------
    ConfigError
        When ``http.host`` is not loopback, no ``[[http.tokens]]`` is
        configured and ``http.allow_unauthenticated`` is not set.
    """
    http = settings.http
    if http.allow_unauthenticated:
        logger.warning("http.allow_unauthenticated is set: patient data is served over HTTP without any token "
                       "to whoever reaches %s:%d (only behind an authenticating proxy)", http.host, http.port)
        return
    if not http.tokens:
        if not is_loopback_host(http.host):
            raise ConfigError(
                f"refusing to start: http.host {http.host or '(all interfaces)'} is not a loopback address and no "
                "[[http.tokens]] is configured; create one with `pacs-node token create`, or set "
                "http.allow_unauthenticated = true to serve patient data without authentication (not recommended)")
        logger.warning("no [[http.tokens]] configured: every patient-data HTTP endpoint answers 401 "
                       "(create a token with `pacs-node token create`)")
    if http.tls_cert is None and not is_loopback_host(http.host):
        logger.warning("the HTTP server on %s has no TLS (http.tls_cert): tokens and patient data cross the "
                       "network in clear text unless a TLS proxy is in front", http.host)


def serve(settings: Settings, config_file: str | None = None) -> int:
    try:
        check_http_exposure(settings)
    except ConfigError as exc:
        print(f"pacs-node: {exc}", file=sys.stderr)
        return 2
    provision_demo_model(settings)
    node = Node.from_settings(settings)
    worker = None
    if settings.queue.start_worker:
        worker = WorkerProcess(config_file, log_file=None)
    try:
        try:
            server = NodeServer(node, worker=worker)
        except ConfigError as exc:
            print(f"pacs-node: {exc}", file=sys.stderr)
            return 2
        server.run_forever()
    finally:
        node.close()
    return 0
