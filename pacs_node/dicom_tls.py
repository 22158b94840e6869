"""DICOM TLS (PS3.15 Annex B.1, the BCP 195 profiles): SSL contexts for the
node's SCP and for its associations to remote peers (delivery, pull, storage
commitment).

* :func:`server_context` — the SCP side: the node's certificate chain and key;
  with a CA bundle every peer must present a client certificate signed by it
  (mutual TLS), otherwise the handshake fails.
* :func:`client_context` — the SCU side towards one peer: the peer's
  certificate is verified against a CA bundle (the system trust store when
  none is given), its host name checked unless turned off, and the node's own
  client certificate presented when the peer requires mutual TLS.
* :class:`PeerTLSSettings` — the ``tls*`` keys shared by ``[[destinations]]``
  and ``[[sources]]``; :func:`peer_tls_args` turns them into the
  ``tls_args`` of :meth:`pynetdicom.ae.ApplicationEntity.associate`.

Both ends use TLS 1.2 or later with OpenSSL's default cipher suites, which
include those of the BCP 195 profiles dcmtk and dcm4chee offer by default.
Contexts for peers are cached per file set and modification time, so a
renewed certificate is picked up on the next association without a restart.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, FilePath, model_validator

__all__ = [
    "PeerTLSSettings",
    "TLSConfigError",
    "client_context",
    "diagnose_tls",
    "peer_certificate_subject",
    "peer_tls_args",
    "server_context",
]

logger = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be loaded; the message names the file."""


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the {what} certificate {cert}"
                             f"{f' with key {key}' if key else ''}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the CA bundle {ca}: {exc}") from None


def server_context(cert: Path, key: Path | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """The SSL context of the node's TLS listener.

    Parameters
    ----------
    cert:
        PEM certificate (chain) of the node; it may also hold the key.
    key:
        PEM private key (unencrypted), when not in ``cert``.
    ca:
        PEM CA bundle. When given, a peer must present a certificate signed by
        one of these CAs (mutual TLS); otherwise no client certificate is asked for.

    Returns
    -------
    ssl.SSLContext
        A server-side context, TLS 1.2 or later.

    Raises
    ------
    TLSConfigError
        When a file cannot be read or the key does not match the certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, "server")
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(*, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                   verify_hostname: bool = True) -> ssl.SSLContext:
    """An SSL context for associations the node opens to one peer.

    Parameters
    ----------
    ca:
        PEM CA bundle the peer's certificate must chain to; ``None`` uses the
        system trust store.
    cert, key:
        The node's client certificate and key, for peers that require mutual
        TLS (``key`` may be omitted when ``cert`` holds it).
    verify_hostname:
        Check that the peer's certificate names the host the node connects to
        (DNS name or IP address in subjectAltName). The chain is verified
        either way.

    Returns
    -------
    ssl.SSLContext
        A client-side context, TLS 1.2 or later, verifying the peer.

    Raises
    ------
    TLSConfigError
        When a file cannot be read or the key does not match the certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        # Only the configured CA: a hospital CA, not every public one.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_ca(ctx, ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        _load_chain(ctx, cert, key, "client")
    return ctx


def _stamp(path: Path | None) -> tuple[str, float] | None:
    if path is None:
        return None
    try:
        return str(path), path.stat().st_mtime
    except OSError:
        return str(path), -1.0


@functools.lru_cache(maxsize=64)
def _cached_client_context(ca: tuple[str, float] | None, cert: tuple[str, float] | None,
                           key: tuple[str, float] | None, verify_hostname: bool) -> ssl.SSLContext:
    return client_context(ca=Path(ca[0]) if ca else None, cert=Path(cert[0]) if cert else None,
                          key=Path(key[0]) if key else None, verify_hostname=verify_hostname)


class PeerTLSSettings(BaseModel):
    """The ``tls*`` keys of a DIMSE ``[[destinations]]`` / ``[[sources]]`` table.

    ::

        tls = true
        tls_ca = "/etc/pacs-node/tls/hospital-ca.pem"    # default: system trust store
        tls_cert = "/etc/pacs-node/tls/node.pem"         # only when the peer requires
        tls_key = "/etc/pacs-node/tls/node.key"          #   client certificates
        # tls_verify_hostname = true
    """

    model_config = {"extra": "forbid"}

    #: Open the association over TLS (DICOM TLS, e.g. port 2762).
    tls: bool = False
    #: PEM CA bundle the peer's certificate must chain to (default: the system trust store).
    tls_ca: FilePath | None = None
    #: The node's client certificate (PEM), for peers that require mutual TLS.
    tls_cert: FilePath | None = None
    #: Key of ``tls_cert`` (PEM, unencrypted), unless ``tls_cert`` holds it.
    tls_key: FilePath | None = None
    #: Check that the peer's certificate names ``host``.
    tls_verify_hostname: bool = True

    @model_validator(mode="after")
    def _check_tls(self) -> "PeerTLSSettings":
        if not self.tls and (self.tls_ca or self.tls_cert or self.tls_key):
            raise ValueError("tls_ca / tls_cert / tls_key are set but tls = false")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key needs tls_cert")
        return self


class _HasPeerTLS(Protocol):
    tls: bool
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_verify_hostname: bool


def peer_tls_args(peer: _HasPeerTLS, host: str) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate(..., tls_args=...)`` towards ``host``, or
    ``None`` when the peer is not configured for TLS.

    Raises
    ------
    TLSConfigError
        When a configured file cannot be loaded.
    """
    if not peer.tls:
        return None
    ctx = _cached_client_context(_stamp(peer.tls_ca), _stamp(peer.tls_cert), _stamp(peer.tls_key),
                                 peer.tls_verify_hostname)
    return ctx, host


def diagnose_tls(host: str, port: int, tls_args: tuple[ssl.SSLContext, str], timeout: float,
                 wait: float = 2.0) -> Exception | None:
    """Connect and run only the TLS handshake: the reason an association over
    TLS could not be opened (pynetdicom reports just "unable to connect", or
    an abort).

    With TLS 1.3 the server checks the client's certificate after the client
    considers the handshake done and answers with an alert on the first read,
    so the connection is read for up to ``wait`` seconds: a server waiting
    for the A-ASSOCIATE-RQ sends nothing.

    Returns
    -------
    Exception or None
        The :class:`ssl.SSLError` (a certificate that does not verify, a peer
        that requires a client certificate...) or :class:`OSError` (refused,
        unreachable, timed out, closed after the handshake); ``None`` when
        the handshake succeeds and the peer waits.
    """
    ctx, server_hostname = tls_args
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.settimeout(wait)
                try:
                    if tls.recv(1) == b"":
                        return ConnectionError("the peer closed the connection after the TLS handshake")
                except TimeoutError:
                    return None
                return None
    except OSError as exc:  # ssl.SSLError is an OSError
        return exc


def peer_certificate_subject(sock: Any) -> str | None:
    """``CN=...`` (or the whole subject) of the verified peer certificate of an
    SSL socket; ``None`` for a plain socket or no certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    parts = [f"{k}={v}" for rdn in subject for (k, v) in rdn]
    common = [p for p in parts if p.startswith("commonName=")]
    return (common[0].replace("commonName=", "CN=") if common else ", ".join(parts)) or None
