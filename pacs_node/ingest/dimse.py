"""DIMSE front end: a pynetdicom C-ECHO / C-STORE service class provider.

Handlers are small functions in the style of pynetdicom's ``storescp`` app:
the C-STORE handler parses the header of what the peer sent (in the
negotiated transfer syntax), puts the data set's bytes, as received, behind
a File Meta group the node writes (:mod:`pacs_node.ingest.part10`), hands
them to the :class:`~pacs_node.ingest.recorder.Ingestor` and answers
0x0000 only once the file and its row are durable. Every failure gets a
specific status with an Error Comment, and the association stays up.

Connections are accepted by :class:`~pacs_node.ingest.guard.GuardedServer`
(per-address and pre-association limits, the A-ASSOCIATE-RQ read and checked
before pynetdicom sees it, PDU size limits, the TLS handshake off the accept
loop) and every association's data sets go through
:mod:`pacs_node.ingest.spool` (bounded memory, ``max_instance_bytes``). With
``[dicom] tls_cert`` the SCP speaks DICOM TLS on ``port``, or on ``tls_port``
beside plain DICOM on ``port`` (:mod:`pacs_node.dicom_tls`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from datetime import datetime
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_recv_handler
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_node.config import DicomSettings
from pacs_node.dicom_tls import peer_certificate_subject, server_context
from pacs_node.ingest.arrivals import dimse_arrival_handlers
from pacs_node.ingest.commitment import add_commitment_context, commitment_handlers
from pacs_node.ingest.guard import ConnectionGuard, GuardedServer, Limits
from pacs_node.ingest.polling import enable_adaptive_polling
from pacs_node.ingest.recorder import IngestError, Ingestor, Status, encode_part10
from pacs_node.ingest.spool import guard_dimse, refusal, release

__all__ = ["SEGMENTATION_LABELMAP", "DimseServer", "handle_echo", "handle_store", "storage_sop_classes"]

logger = logging.getLogger(__name__)

#: Segmentation LABELMAP storage (2023), missing from pynetdicom's defaults.
SEGMENTATION_LABELMAP = "1.2.840.10008.5.1.4.1.1.66.7"


def storage_sop_classes() -> list[str]:
    """Every storage SOP class the SCP accepts."""
    uids = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    if SEGMENTATION_LABELMAP not in uids:
        uids.append(SEGMENTATION_LABELMAP)
    return uids


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        # Error Comment is LO (64 chars max) and must not carry patient data.
        ds.ErrorComment = comment[:64]
    return ds


def _peer(event: evt.Event) -> str:
    req = event.assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


def handle_echo(event: evt.Event) -> int:
    logger.debug("C-ECHO from %s", _peer(event))
    return 0x0000


def handle_store(event: evt.Event, ingestor: Ingestor) -> Dataset:
    """Store one instance; return the C-STORE response status.

    Parameters
    ----------
    event:
        The ``EVT_C_STORE`` event.
    ingestor:
        Writes the file and commits the row.
    """
    calling = event.assoc.requestor.ae_title
    received = cast(C_STORE, event.request).DataSet
    try:
        refused = refusal(received)
        if refused is not None:  # too large, or could not be spooled (pacs_node.ingest.spool)
            return _status(Status.OUT_OF_RESOURCES, refused)
        # The data set as received, parsed in the negotiated transfer syntax
        # and stored behind a File Meta group the node writes itself.
        dataset = event.encoded_dataset(include_meta=False)
        meta = ingestor.parse(dataset, transfer_syntax_uid=str(event.context.transfer_syntax))
        req = cast(C_STORE, event.request)
        if str(req.AffectedSOPInstanceUID) != meta.sop_uid:
            raise IngestError(Status.UID_MISMATCH, "SOP Instance UID differs from the C-STORE request")
        if str(req.AffectedSOPClassUID) != meta.sop_class_uid:
            raise IngestError(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the C-STORE request"
            )
        aet = calling if calling.isascii() and len(calling) <= 16 else None
        data = encode_part10(dataset, meta, source_aet=aet)
        outcome = ingestor.ingest(data, meta, source="dimse", calling_aet=calling,
                                  arrival=ingestor.arrivals.key_for(event.assoc))
    except IngestError as exc:
        logger.warning("C-STORE from %s refused: 0x%04X %s", _peer(event), exc.status, exc.comment)
        return _status(exc.status, exc.comment)
    except Exception:  # noqa: BLE001 - the server must answer, never crash
        logger.exception("C-STORE from %s failed unexpectedly", _peer(event))
        return _status(Status.PROCESSING_FAILURE, "unexpected processing failure")
    finally:
        release(received)
    logger.debug(
        "stored %s from %s%s", outcome.relpath, calling, " (duplicate)" if outcome.duplicate else ""
    )
    return _status(Status.SUCCESS)


def handle_conn_open(event: evt.Event, settings: DicomSettings) -> None:
    """Set TCP_NODELAY on every accepted socket (peers otherwise stall ~44 ms per
    message) and make its DUL poll fast while data flows (:mod:`.polling`)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # pragma: no cover - closed already
            logger.debug("cannot set TCP_NODELAY: %s", exc)
    if settings.active_poll_ms > 0:
        enable_adaptive_polling(event.assoc.dul, settings.active_poll_ms / 1000.0)


def handle_rejected(event: evt.Event, settings: DicomSettings) -> None:
    """Log who was refused and why (pynetdicom sends the A-ASSOCIATE-RJ)."""
    req = event.assoc.requestor
    primitive = req.primitive
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    calling = str(getattr(primitive, "calling_ae_title", "") or req.ae_title).strip()
    if settings.allowed_calling_aets and calling not in settings.allowed_calling_aets:
        reason = "calling AE title not recognised (not in dicom.allowed_calling_aets)"
    elif settings.require_called_aet and called != settings.ae_title:
        reason = f"called AE title not recognised (expected {settings.ae_title!r})"
    elif getattr(event.assoc.acceptor.primitive, "diagnostic", None) == 0x02 and \
            getattr(event.assoc.acceptor.primitive, "result_source", None) == 0x03:
        reason = f"local limit exceeded (dicom.max_associations = {settings.max_associations})"
    else:
        reason = "association request not acceptable"
    logger.warning(
        "association refused: calling AE %r from %s:%s, called AE %r: %s",
        calling,
        req.address,
        req.port,
        called,
        reason,
    )


def handle_accepted(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    subject = peer_certificate_subject(sock)
    tls = f" over TLS ({subject})" if subject else (" over TLS" if isinstance(sock, ssl.SSLSocket) else "")
    logger.info("association accepted from %s%s", _peer(event), tls)


class DimseServer:
    """The C-ECHO / C-STORE SCP.

    Parameters
    ----------
    settings:
        The ``[dicom]`` settings.
    ingestor:
        Stores and records instances.
    """

    def __init__(self, settings: DicomSettings, ingestor: Ingestor) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.ae = self._build_ae()
        self.limits = Limits.from_settings(settings, ingestor.store.root)
        #: Connections per address and in the pre-association phase, shared by both listeners.
        self.guard = ConnectionGuard(self.limits)
        self._servers: dict[str, GuardedServer] = {}
        self._lock = threading.Lock()

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        transfer_syntaxes = [str(ts) for ts in AllTransferSyntaxes]
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, transfer_syntaxes)
        ae.add_supported_context(Verification, transfer_syntaxes)
        add_commitment_context(ae)  # Storage Commitment reports (N-EVENT-REPORT) from archives
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_called_aet = s.require_called_aet
        if s.allowed_calling_aets:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        return ae

    @property
    def _server(self) -> GuardedServer | None:
        """The listener of ``[dicom] port`` (None before start)."""
        return self._servers.get("plain") or self._servers.get("tls")

    @property
    def tls(self) -> bool:
        """Whether a TLS listener is configured."""
        return self.settings.tls_cert is not None

    @property
    def port(self) -> int:
        """The port actually bound for ``[dicom] port`` (useful with ``port = 0``):
        plain DICOM, or TLS when the node speaks TLS only."""
        server = self._servers.get("plain") or self._servers.get("tls")
        if server is None:
            raise RuntimeError("server not started")
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The port actually bound by the TLS listener.

        Raises
        ------
        RuntimeError
            When the server is not started or has no TLS listener.
        """
        server = self._servers.get("tls")
        if server is None:
            raise RuntimeError("no TLS listener (server not started or [dicom] tls_cert unset)")
        return int(server.server_address[1])

    def _on_association(self, assoc: Any) -> None:
        req = assoc.requestor
        guard_dimse(assoc, self.limits, f"{req.address}:{req.port}", self.guard.log)

    def _listen(self, name: str, port: int, handlers: list[Any], tls_context: Any) -> GuardedServer:
        # ae.start_server() with the node's server class (pacs_node.ingest.guard).
        server = cast(GuardedServer, self.ae.make_server(
            (self.settings.host, port), evt_handlers=handlers, server_class=GuardedServer,
            guard=self.guard, tls_context=tls_context, on_association=self._on_association))
        # pynetdicom's standard DIMSE log handler reads every received data set
        # back (getvalue()) to print "Data Set: Present": a spooled 2 GiB
        # instance would be read into memory while the next one streams in.
        server.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}-{name}", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # what start_server does; AssociationServer.shutdown() removes it
        self._servers[name] = server
        return server

    def _warn_if_open(self) -> None:
        s = self.settings
        try:
            loopback = ipaddress.ip_address(s.host).is_loopback
        except ValueError:
            loopback = s.host == "localhost"
        if loopback or s.allowed_calling_aets or (s.tls_ca is not None and s.tls_port is None):
            return
        logger.warning(
            "the DICOM SCP listens on %s with neither dicom.allowed_calling_aets nor client certificates "
            "(dicom.tls_ca, TLS only): any host that reaches it can store instances", s.host)

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor]),
            (evt.EVT_CONN_OPEN, handle_conn_open, [self.settings]),
            (evt.EVT_REJECTED, handle_rejected, [self.settings]),
            (evt.EVT_ACCEPTED, handle_accepted),
            *commitment_handlers(self.ingestor.db),
            # Close each association's arrival (released / aborted / lost).
            *dimse_arrival_handlers(self.ingestor.arrivals),
        ]
        s = self.settings
        tls_context = server_context(s.tls_cert, s.tls_key, s.tls_ca) if s.tls_cert is not None else None
        with self._lock:
            if tls_context is None or s.tls_port is not None:
                self._listen("plain", s.port, handlers, None)
            if tls_context is not None:
                self._listen("tls", s.port if s.tls_port is None else s.tls_port, handlers, tls_context)
        for name, server in self._servers.items():
            mode = "TLS" + (" with client certificates" if s.tls_ca else "") if name == "tls" else "plain"
            logger.info("DIMSE SCP %s listening on %s:%d (%s)", s.ae_title, s.host, server.server_address[1], mode)
        self._warn_if_open()

    def stop(self) -> None:
        """Stop accepting, close connections still without an association,
        wait (up to ``network_timeout``) for running associations to finish."""
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        if not servers:
            return
        running = [a for server in servers for a in server.active_associations]
        if running:
            logger.info("waiting for %d running association(s) to finish", len(running))
        for server in servers:
            server.shutdown()  # stops accepting; closes pending connections
        deadline = time.monotonic() + self.settings.network_timeout
        for assoc in running:
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        logger.info("DIMSE SCP stopped")
