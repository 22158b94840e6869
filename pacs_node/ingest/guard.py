"""Network limits of the DIMSE SCP: what a peer may make the node hold before
it has an association, and how large a PDU may be.

pynetdicom (3.0) reads a PDU in full before looking at it, with no limit and
no time-out once the 6-byte header has arrived; it creates an association
thread for every TCP connection, counted against ``max_associations``, and
waits ``acse_timeout`` for the A-ASSOCIATE-RQ; with TLS, its accept loop runs
the handshake of every new connection itself, so one silent TLS client stops
it from accepting anything (read in pynetdicom 3.0.4, the version pinned by
``pynetdicom>=3.0,<4``). Issue 13 measured the effect on the node before
this module: a 4 GiB A-ASSOCIATE-RQ streamed at the SCP was buffered
(600 MiB sent: 1.35 GB resident) and 16 silent sockets refused every sender
for 30 s. tests/test_dimse_limits.py runs those attacks against it.

:class:`GuardedServer` therefore runs the *pre-association phase* itself, in
one thread per connection, before pynetdicom sees the connection:

1. Admission, in the accept loop: at most ``max_connections_per_peer``
   connections per IP address and ``4 × max_associations`` connections in
   the pre-association phase. An extra connection gets A-ASSOCIATE-RJ
   (rejected-transient, service-provider presentation, local-limit-exceeded)
   once its request has been read; beyond ``max_associations`` such
   refusals at a time it is closed at once.
2. TLS handshake (when the listener is TLS) and the whole A-ASSOCIATE-RQ
   within ``pre_association_timeout`` seconds of the accept; otherwise the
   connection is closed (PS3.8 ARTIM expiry in Sta2).
3. The request's header is checked before its body is read: a PDU other
   than A-ASSOCIATE-RQ gets A-ABORT (unexpected / unrecognized PDU), a length
   above ``max_associate_rq_bytes`` or below the fixed fields gets A-ABORT
   (invalid-PDU-parameter-value). A body that does not decode gets the same.

Only then is a pynetdicom association created, with the request already
read (:class:`GuardedSocket` hands it to the DUL first): pending connections
never count against ``max_associations``. During the association every PDU
is read whole by :class:`GuardedSocket` before pynetdicom parses it: a
P-DATA-TF longer than the Maximum Length the node announced
(``max_pdu_size``), or any other PDU longer than ``max_associate_rq_bytes``,
gets A-ABORT (invalid-PDU-parameter-value) after its header, and a PDU must
arrive complete within ``network_timeout``. Data set size and memory while a
C-STORE streams in: :mod:`pacs_node.ingest.spool`.

Every refusal is logged at WARNING (at most one line per kind and address
every 10 s, with the count of those suppressed), without patient data.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from pacs_node.config import DicomSettings

__all__ = [
    "ABORT_INVALID_PARAMETER",
    "ABORT_UNEXPECTED_PDU",
    "ABORT_UNRECOGNIZED_PDU",
    "ConnectionGuard",
    "GuardedServer",
    "GuardedSocket",
    "Limits",
    "Throttle",
    "abort_pdu",
    "reject_pdu",
    "send_and_close",
]

logger = logging.getLogger(__name__)

#: A-ABORT reasons (PS3.8 Table 9-26), source 2 = DICOM UL service-provider.
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06
#: Fixed fields of an A-ASSOCIATE-RQ after its header (PS3.8 Table 9-11).
_RQ_FIXED = 68
#: A P-DATA-TF ceiling when the announced Maximum Length is 0 (unlimited).
_PDU_CEILING = 64 * 1024 * 1024
#: Seconds between two log lines of one kind of refusal for one address.
_LOG_INTERVAL = 10.0


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8)."""
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


#: rejected-transient, service-provider (presentation), local-limit-exceeded.
REJECT_LOCAL_LIMIT = reject_pdu(0x02, 0x03, 0x02)


@dataclass(frozen=True)
class Limits:
    """The ``[dicom]`` limits, resolved."""

    max_associate_rq_bytes: int
    pre_association_timeout: float
    max_connections_per_peer: int
    max_pending: int
    max_refusing: int
    network_timeout: float
    max_instance_bytes: int
    spool_dir: Path

    @classmethod
    def from_settings(cls, s: DicomSettings, spool_dir: Path) -> "Limits":
        return cls(
            max_associate_rq_bytes=s.max_associate_rq_bytes,
            pre_association_timeout=s.pre_association_timeout,
            max_connections_per_peer=s.max_connections_per_peer,
            max_pending=4 * s.max_associations,
            max_refusing=s.max_associations,
            network_timeout=s.network_timeout,
            max_instance_bytes=s.max_instance_bytes,
            spool_dir=spool_dir,
        )


class Throttle:
    """At most one log line per kind and address every :data:`_LOG_INTERVAL` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[float]] = {}

    def warn(self, kind: str, address: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get((kind, address))
            if entry is not None and now - entry[0] < _LOG_INTERVAL:
                entry[1] += 1
                return
            suppressed = int(entry[1]) if entry else 0
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[(kind, address)] = [now, 0]
        if suppressed:
            msg += " (%d more like it from this address in the last %.0f s)"
            args = (*args, suppressed, _LOG_INTERVAL)
        logger.warning(msg, *args)


class ConnectionGuard:
    """Counts connections per IP address and in the pre-association phase.

    Parameters
    ----------
    limits:
        The resolved limits.
    """

    OK, REFUSE, DROP = "ok", "refuse", "drop"

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        #: Log lines of this server's refusals.
        self.log = Throttle()
        self._lock = threading.Lock()
        self._per_peer: Counter[str] = Counter()
        self._pending: dict[int, socket.socket] = {}
        self._refusing = 0

    def admit(self, ip: str, sock: socket.socket) -> tuple[str, str]:
        """Decide in the accept loop: ``(OK | REFUSE | DROP, why)``."""
        lim = self.limits
        with self._lock:
            if lim.max_connections_per_peer and self._per_peer[ip] >= lim.max_connections_per_peer:
                why = (f"{self._per_peer[ip]} connections already open from this address "
                       f"(dicom.max_connections_per_peer = {lim.max_connections_per_peer})")
            elif len(self._pending) >= lim.max_pending:
                why = f"{len(self._pending)} connections waiting for an association request (4 x max_associations)"
            else:
                self._per_peer[ip] += 1
                self._pending[id(sock)] = sock
                return self.OK, ""
            if self._refusing < lim.max_refusing:
                self._refusing += 1
                return self.REFUSE, why
            return self.DROP, why

    def track(self, sock: socket.socket, conn: socket.socket) -> None:
        """``conn`` (the TLS socket) now carries the pending connection ``sock``."""
        with self._lock:
            if id(sock) in self._pending:
                self._pending[id(sock)] = conn

    def established(self, sock: socket.socket) -> None:
        """The connection left the pre-association phase (it has an association)."""
        with self._lock:
            self._pending.pop(id(sock), None)

    def release(self, ip: str, sock: socket.socket, admission: str) -> None:
        """The connection ended."""
        with self._lock:
            if admission == self.OK:
                self._pending.pop(id(sock), None)
                self._per_peer[ip] -= 1
                if self._per_peer[ip] <= 0:
                    del self._per_peer[ip]
            elif admission == self.REFUSE:
                self._refusing -= 1

    def connections(self, ip: str) -> int:
        with self._lock:
            return self._per_peer[ip]

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close_pending(self) -> None:
        """Shut down every connection still in the pre-association phase (stop)."""
        with self._lock:
            socks = list(self._pending.values())
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Closed(Exception):
    """The peer closed, timed out or was refused; the reason is logged already."""


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> int:
    """Fill ``view`` from ``sock`` by ``deadline``; bytes read (fewer: peer closed).

    Raises
    ------
    TimeoutError
        When the deadline passes first.
    """
    got = 0
    while got < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        n = sock.recv_into(view[got:], min(len(view) - got, 1 << 20))
        if n == 0:
            break
        got += n
    return got


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass


#: After an A-ABORT / A-ASSOCIATE-RJ: how long, and how much, the node reads
#: and drops what the peer still sends before closing (PS3.8 Sta13).
LINGER_SECONDS = 1.0
LINGER_BYTES = 4 * 1024 * 1024


def send_and_close(sock: socket.socket, pdu: bytes) -> None:
    """Send ``pdu`` (an A-ABORT or A-ASSOCIATE-RJ), then end the connection.

    Closing a socket with unread data makes the kernel send a reset, which
    can overtake the PDU: the peer would see "connection reset" instead of
    the refusal. So the node closes its sending side, reads and drops what
    arrives for at most :data:`LINGER_SECONDS` / :data:`LINGER_BYTES` (the
    peer closes once it reads the PDU), and only then shuts the socket down.
    """
    _send_quietly(sock, pdu)
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except (OSError, ValueError):
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _peer(address: Any) -> str:
    return f"{address[0]}:{address[1]}"


def read_associate_rq(sock: socket.socket, address: Any, limits: Limits, deadline: float,
                      throttle: Throttle) -> bytes:
    """Read one A-ASSOCIATE-RQ PDU (header and body) within the limits.

    Raises
    ------
    _Closed
        When the peer closed or sent something else (answered with A-ABORT
        where the protocol has one); the reason is logged.
    """
    where = _peer(address)
    header = bytearray(6)
    try:
        got = _recv_into(sock, memoryview(header), deadline)
    except TimeoutError:
        throttle.warn("timeout", address[0], "no A-ASSOCIATE-RQ from %s within %.1f s "
                      "(dicom.pre_association_timeout): connection closed", where, limits.pre_association_timeout)
        raise _Closed from None
    if got == 0:  # a port probe / health check: connected and closed
        logger.debug("connection from %s closed before an association request", where)
        raise _Closed
    if got < 6:
        logger.debug("connection from %s closed inside a PDU header", where)
        raise _Closed
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != 0x01:
        if pdu_type == 0x07:  # the peer aborts: nothing to answer
            raise _Closed
        known = 0x02 <= pdu_type <= 0x07
        reason = ABORT_UNEXPECTED_PDU if known else ABORT_UNRECOGNIZED_PDU
        throttle.warn("pdu", address[0], "%s PDU type 0x%02X from %s before an association: A-ABORT",
                      "unexpected" if known else "unrecognized", pdu_type, where)
        send_and_close(sock, abort_pdu(reason))
        raise _Closed
    if length > limits.max_associate_rq_bytes or length < _RQ_FIXED:
        throttle.warn("rq-size", address[0], "A-ASSOCIATE-RQ from %s declares %d bytes (%s): A-ABORT", where, length,
                      f"dicom.max_associate_rq_bytes = {limits.max_associate_rq_bytes}"
                      if length > limits.max_associate_rq_bytes else "shorter than its fixed fields")
        send_and_close(sock, abort_pdu(ABORT_INVALID_PARAMETER))
        raise _Closed
    pdu = bytearray(6 + length)
    pdu[:6] = header
    try:
        got = _recv_into(sock, memoryview(pdu)[6:], deadline)
    except TimeoutError:
        throttle.warn("rq-timeout", address[0], "A-ASSOCIATE-RQ from %s not complete within %.1f s "
                      "(dicom.pre_association_timeout): connection closed", where, limits.pre_association_timeout)
        raise _Closed from None
    if got < length:
        logger.debug("connection from %s closed inside its A-ASSOCIATE-RQ", where)
        raise _Closed
    for name, field, reason in (("called", pdu[10:26], 0x07), ("calling", pdu[26:42], 0x03)):
        # AE titles are the default repertoire without backslash or control
        # characters (PS3.5 §6.2, AE). pynetdicom would log each other byte
        # at ERROR with a traceback, then guess a codec.
        if any(b < 0x20 or b > 0x7E or b == 0x5C for b in field):
            throttle.warn("rq-aet", address[0], "A-ASSOCIATE-RQ from %s: the %s AE title has characters AE "
                          "does not allow: A-ASSOCIATE-RJ", where, name)
            send_and_close(sock, reject_pdu(0x01, 0x01, reason))
            raise _Closed
    try:
        A_ASSOCIATE_RQ().decode(bytes(pdu))
    except Exception:  # noqa: BLE001 - any decoding failure is the peer's malformed request
        throttle.warn("rq-invalid", address[0], "A-ASSOCIATE-RQ from %s does not decode: A-ABORT", where)
        send_and_close(sock, abort_pdu(ABORT_INVALID_PARAMETER))
        raise _Closed from None
    return bytes(pdu)


class GuardedSocket(AssociationSocket):
    """pynetdicom's association socket, reading every PDU whole and within limits.

    Installed by class assignment on the socket pynetdicom built (its
    constructor queues the transport-connection event); :meth:`guard`
    supplies the A-ASSOCIATE-RQ already read. pynetdicom's DUL reads a PDU as
    ``recv(6)`` then ``recv(length)``: the first call reads and checks the
    whole PDU, the second is served from it. A refused PDU is answered with
    A-ABORT here and reported to the DUL as a closed connection (a short
    header), which it turns into A-P-ABORT for the association.
    """

    _pending: bytearray
    _offset: int
    _limits: Limits
    _where: str
    _log: Throttle

    def guard(self, prefix: bytes, limits: Limits, where: str, log: Throttle) -> None:
        self._pending = bytearray(prefix)
        self._offset = 0
        self._limits = limits
        self._where = where
        self._log = log

    @property
    def ready(self) -> bool:
        if self._offset < len(self._pending):
            return True
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        if self._offset >= len(self._pending):
            pdu = self._read_pdu()
            if pdu is None:
                return bytearray()
            self._pending, self._offset = pdu, 0
        start = self._offset
        self._offset = min(len(self._pending), start + nr_bytes)
        chunk = self._pending[start:self._offset]
        if self._offset >= len(self._pending):
            self._pending, self._offset = bytearray(), 0
        return chunk

    def _refuse(self, msg: str, *args: Any) -> None:
        self._log.warn("pdu-size", self._where.rsplit(":", 1)[0], msg, *args)
        send_and_close(cast(socket.socket, self.socket), abort_pdu(ABORT_INVALID_PARAMETER))

    def _read_pdu(self) -> bytearray | None:
        sock = self.socket
        if sock is None:
            return None
        lim = self._limits
        header = bytearray(6)
        try:
            deadline = time.monotonic() + lim.network_timeout
            if _recv_into(sock, memoryview(header), deadline) < 6:
                return None  # closed: the DUL sees a short header
            pdu_type, _, length = struct.unpack(">BBL", header)
            if not 0x01 <= pdu_type <= 0x07:
                return header  # pynetdicom answers an unknown type with A-ABORT
            if pdu_type == 0x04:
                announced = int(self.assoc.acceptor.maximum_length or 0) or _PDU_CEILING
                if length > announced:
                    self._refuse("P-DATA-TF PDU from %s declares %d bytes, more than the maximum length %d "
                                 "(dicom.max_pdu_size): A-ABORT", self._where, length, announced)
                    return None
            elif length > lim.max_associate_rq_bytes:
                self._refuse("PDU type 0x%02X from %s declares %d bytes (dicom.max_associate_rq_bytes = %d): "
                             "A-ABORT", pdu_type, self._where, length, lim.max_associate_rq_bytes)
                return None
            pdu = bytearray(6 + length)
            pdu[:6] = header
            if _recv_into(sock, memoryview(pdu)[6:], deadline) < length:
                return None
            return pdu
        except TimeoutError:
            self._refuse("PDU from %s not complete within %.0f s (dicom.network_timeout): A-ABORT",
                         self._where, lim.network_timeout)
            return None
        except OSError:
            return None
        finally:
            try:
                # pynetdicom's sends then block at most network_timeout.
                sock.settimeout(lim.network_timeout)
            except OSError:
                pass


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's association server with the pre-association phase above.

    Parameters (besides pynetdicom's)
    ----------
    guard:
        Shared by every listener of the node (plain and TLS).
    tls_context:
        Server-side context: the listener speaks TLS; the handshake runs in
        the connection's thread, within ``pre_association_timeout``.
    on_association:
        Called with each new pynetdicom association before it starts (the
        node installs its DIMSE data set limits there).
    """

    # Connection threads only wait for their association; stop() decides how
    # long to wait for running associations (DimseServer.stop).
    daemon_threads = True
    block_on_close = False
    # listen() backlog: socketserver's 5 makes a burst of connections (a
    # flood, or many modalities at once) wait 1-3 s in SYN retransmission.
    request_queue_size = 128

    def __init__(self, *args: Any, guard: ConnectionGuard, tls_context: ssl.SSLContext | None = None,
                 on_association: Any = None, **kwargs: Any) -> None:
        self.guard = guard
        self.tls_context = tls_context
        self.on_association = on_association
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Accept only: pynetdicom would run the TLS handshake here, in the
        # accept loop, where one silent client blocks every other.
        assert self.socket is not None
        return cast(tuple[socket.socket, tuple[str, int]], self.socket.accept())

    def process_request(self, request: Any, client_address: Any) -> None:
        sock = cast(socket.socket, request)
        admission, why = self.guard.admit(str(client_address[0]), sock)
        if admission == ConnectionGuard.DROP:
            self.guard.log.warn("limit", str(client_address[0]), "connection from %s closed at once: %s",
                                _peer(client_address), why)
            self.shutdown_request(sock)
            return
        if admission == ConnectionGuard.REFUSE:
            self.guard.log.warn("limit", str(client_address[0]), "connection from %s over the limit: %s: "
                                "its association request gets A-ASSOCIATE-RJ local-limit-exceeded",
                                _peer(client_address), why)
        t = threading.Thread(target=self._connection, args=(sock, client_address, admission, why),
                             name=f"DicomConnection@{_peer(client_address)}", daemon=True)
        t.start()

    def _connection(self, sock: socket.socket, address: Any, admission: str, why: str) -> None:
        ip = str(address[0])
        deadline = time.monotonic() + self.guard.limits.pre_association_timeout
        conn: socket.socket = sock
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.tls_context is not None:
                conn = self._handshake(sock, address, deadline)
                self.guard.track(sock, conn)
            rq = read_associate_rq(conn, address, self.guard.limits, deadline, self.guard.log)
            if admission == ConnectionGuard.REFUSE:
                logger.debug("association from %s refused (%s): A-ASSOCIATE-RJ local-limit-exceeded",
                             _peer(address), why)
                send_and_close(conn, REJECT_LOCAL_LIMIT)
            else:
                self.guard.established(sock)
                conn.settimeout(None)  # pynetdicom polls with select(); GuardedSocket sets its own time-outs
                _AssociationHandler(conn, address, self, rq)
        except _Closed:
            pass
        except Exception:  # noqa: BLE001 - a connection thread must never take the server down
            logger.exception("connection from %s failed unexpectedly", _peer(address))
        finally:
            self.guard.release(ip, sock, admission)
            self._close(conn)

    def _handshake(self, sock: socket.socket, address: Any, deadline: float) -> socket.socket:
        assert self.tls_context is not None
        try:
            conn = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            logger.debug("TLS wrap of %s failed: %s", _peer(address), exc)
            raise _Closed from None
        try:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.do_handshake()
        except TimeoutError:
            self.guard.log.warn("tls", str(address[0]), "TLS handshake with %s not complete within %.1f s "
                                "(dicom.pre_association_timeout): connection closed",
                                _peer(address), self.guard.limits.pre_association_timeout)
            self._close(conn)
            raise _Closed from None
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.guard.log.warn(f"tls-{reason}", str(address[0]),
                                "TLS handshake with %s failed (%s): connection closed", _peer(address), reason)
            self._close(conn)
            raise _Closed from None
        return conn

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket."""
        super().shutdown()
        self.guard.close_pending()


class _AssociationHandler(RequestHandler):
    """pynetdicom's request handler, given a connection whose A-ASSOCIATE-RQ
    has been read; runs the association to its end in the calling thread."""

    server: GuardedServer

    def __init__(self, request: socket.socket, client_address: Any, server: GuardedServer, rq: bytes) -> None:
        self._rq = rq
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        assoc = self._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        sock.__class__ = GuardedSocket
        cast(GuardedSocket, sock).guard(self._rq, self.server.guard.limits, _peer(self.client_address),
                                        self.server.guard.log)
        self._rq = b""
        if self.server.on_association is not None:
            self.server.on_association(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
