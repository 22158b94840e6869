"""DIMSE front end: a pynetdicom C-ECHO / C-STORE service class provider.

Handlers are small functions in the style of pynetdicom's ``storescp`` app:
the C-STORE handler parses the header of what the peer sent (in the
negotiated transfer syntax), puts the data set's bytes, as received, behind
a File Meta group the node writes (:mod:`pacs_node.ingest.part10`), hands
them to the :class:`~pacs_node.ingest.recorder.Ingestor` and answers
0x0000 only once the file and its row are durable. Every failure gets a
specific status with an Error Comment, and the association stays up.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node.config import DicomSettings
from pacs_node.ingest.polling import enable_adaptive_polling
from pacs_node.ingest.recorder import IngestError, Ingestor, Status, encode_part10, parse_meta

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
    try:
        # The data set as received, parsed in the negotiated transfer syntax
        # and stored behind a File Meta group the node writes itself.
        dataset = event.encoded_dataset(include_meta=False)
        meta = parse_meta(dataset, transfer_syntax_uid=str(event.context.transfer_syntax))
        req = cast(C_STORE, event.request)
        if str(req.AffectedSOPInstanceUID) != meta.sop_uid:
            raise IngestError(Status.UID_MISMATCH, "SOP Instance UID differs from the C-STORE request")
        if str(req.AffectedSOPClassUID) != meta.sop_class_uid:
            raise IngestError(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the C-STORE request"
            )
        aet = calling if calling.isascii() and len(calling) <= 16 else None
        data = encode_part10(dataset, meta, source_aet=aet)
        outcome = ingestor.ingest(data, meta, source="dimse", calling_aet=calling)
    except IngestError as exc:
        logger.warning("C-STORE from %s refused: 0x%04X %s", _peer(event), exc.status, exc.comment)
        return _status(exc.status, exc.comment)
    except Exception:  # noqa: BLE001 - the server must answer, never crash
        logger.exception("C-STORE from %s failed unexpectedly", _peer(event))
        return _status(Status.PROCESSING_FAILURE, "unexpected processing failure")
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


def handle_conn_close(event: evt.Event) -> None:
    """Free the association slot of a peer that closed before asking for an association.

    A TCP health check, a load balancer probe or a port scan connects and
    closes without sending an A-ASSOCIATE-RQ. pynetdicom's acceptor thread
    then keeps waiting for the request for ``acse_timeout`` seconds, and every
    such thread counts against ``max_associations``: a burst of probes makes
    the node answer a real PACS with A-ASSOCIATE-RJ "local limit exceeded".

    pynetdicom triggers this event from its DUL thread, the only thread that
    puts primitives on the acceptor's queue, so an unused queue means no
    request ever arrived. ``None`` on the queue is what the acceptor reads as
    "timed out waiting for the request": it ends its thread at once.
    """
    assoc = event.assoc
    queue = assoc.dul.to_user_queue
    if assoc.is_acceptor and queue.unfinished_tasks == 0:
        logger.debug("connection from %s closed before an association request", assoc.requestor.address)
        queue.put(None)


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
    logger.info("association accepted from %s", _peer(event))


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
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        transfer_syntaxes = [str(ts) for ts in AllTransferSyntaxes]
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, transfer_syntaxes)
        ae.add_supported_context(Verification, transfer_syntaxes)
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
    def port(self) -> int:
        """The port actually bound (useful with ``port = 0``)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor]),
            (evt.EVT_CONN_OPEN, handle_conn_open, [self.settings]),
            (evt.EVT_CONN_CLOSE, handle_conn_close),
            (evt.EVT_REJECTED, handle_rejected, [self.settings]),
            (evt.EVT_ACCEPTED, handle_accepted),
        ]
        with self._lock:
            self._server = self.ae.start_server(
                (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
            )
        logger.info(
            "DIMSE SCP %s listening on %s:%d", self.settings.ae_title, self.settings.host, self.port
        )

    def stop(self) -> None:
        """Stop accepting, wait for running associations to finish."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        running = []
        for assoc in list(server.active_associations):
            if assoc.is_established:
                running.append(assoc)
            else:  # a connection that never sent A-ASSOCIATE-RQ (port probe)
                assoc.abort()
        if running:
            logger.info("waiting for %d running association(s) to finish", len(running))
        server.shutdown()  # stops accepting; joins the association threads
        for assoc in running:
            assoc.join(timeout=self.settings.network_timeout)
        logger.info("DIMSE SCP stopped")
