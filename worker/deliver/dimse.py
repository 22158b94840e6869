"""C-STORE SCU delivery (pynetdicom).

One association per attempt. Only the presentation contexts needed are
proposed: one per SOP Class of the outputs, with the files' transfer syntax
(plus Implicit VR Little Endian when the files are Explicit VR Little Endian,
which every SCP accepts; pynetdicom converts between the two). TCP_NODELAY is
set on the socket once the association is up (pynetdicom does not), so each
small C-STORE message is not held back by Nagle's algorithm.

Outcomes:

* connection refused / timed out, association aborted, A-ASSOCIATE-RJ
  "rejected-transient", no C-STORE response, status 0xA7xx → transient;
* A-ASSOCIATE-RJ "rejected-permanent", a SOP Class whose context the SCP
  rejected (recorded as 0x0122 "SOP Class not supported"), status 0xA9xx,
  0xCxxx or any other failure → permanent;
* status 0x0000 and warnings (0x0001, 0xBxxx) → stored.

With ``tls = true`` the association runs over DICOM TLS
(:func:`pacs_node.dicom_tls.peer_tls_args`: the destination's certificate is
verified against ``tls_ca``, its host name checked, the node's client
certificate presented when configured). When it cannot be opened the
handshake is tried once more on its own to say why: a certificate that does
not verify or a TLS handshake the archive refuses (no or wrong client
certificate) is permanent — retrying does not change the certificates —
while a refused or unreachable port stays transient. A TLS file that cannot
be loaded is a permanent failure naming the file.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

from pydicom import dcmread
import ssl

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_node.dicom_tls import TLSConfigError, diagnose_tls, peer_tls_args

from .base import DeliveryItem, DeliveryResult, Deliverer, InstanceStatus, dimse_status_is_transient, register

__all__ = ["DimseDeliverer", "SOP_CLASS_NOT_SUPPORTED"]

log = logging.getLogger(__name__)

#: DIMSE status recorded for an instance whose SOP Class the SCP did not accept.
SOP_CLASS_NOT_SUPPORTED = 0x0122


def _transfer_syntax(item: DeliveryItem) -> str:
    ds = dcmread(str(item.path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.file_meta.TransferSyntaxUID)


@register("dimse")
class DimseDeliverer(Deliverer):
    """C-STORE SCU to ``ae_title@host:port`` from ``calling_ae_title``."""

    #: Whether TCP_NODELAY was set on the last association's socket.
    nodelay: bool = False

    def send(self, items: Sequence[DeliveryItem]) -> DeliveryResult:
        s = self.settings
        contexts: dict[str, list[str]] = {}
        for item in items:
            ts = _transfer_syntax(item)
            syntaxes = contexts.setdefault(item.sop_class_uid, [])
            for t in [ts] + ([str(ImplicitVRLittleEndian)] if ts == ExplicitVRLittleEndian else []):
                if t not in syntaxes:
                    syntaxes.append(t)
        ae = AE(ae_title=s.calling_ae_title or "PACSNODE")
        ae.connection_timeout = s.timeout
        ae.acse_timeout = s.timeout
        ae.dimse_timeout = s.timeout
        ae.network_timeout = s.timeout
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)

        seen: dict[str, Any] = {}

        def on_open(event: Any) -> None:
            seen["connected"] = True

        def on_acse(event: Any) -> None:
            prim = event.primitive
            if getattr(prim, "result", None) is not None:
                seen["assoc_rsp"] = prim

        try:
            tls_args = peer_tls_args(s, s.host)
        except TLSConfigError as exc:
            return DeliveryResult(error=f"destination {s.name}: {exc}", transient=False)
        assoc = ae.associate(
            s.host,
            s.port,
            ae_title=s.ae_title,
            max_pdu=s.max_pdu_size,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)],
            tls_args=tls_args,
        )
        if not assoc.is_established:
            if tls_args is not None and seen.get("assoc_rsp") is None:
                failed = self._tls_failure(tls_args, connected=bool(seen.get("connected")))
                if failed is not None:
                    return failed
            return self._not_established(assoc, seen, items)
        try:
            try:
                sock: Any = assoc.dul.socket.socket  # type: ignore[union-attr]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except (AttributeError, OSError) as exc:  # pragma: no cover - socket already gone
                log.debug("cannot set TCP_NODELAY: %s", exc)
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            result = DeliveryResult()
            for item in items:
                result.instances.append(self._store(assoc, item, accepted))
            return result
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc: Any, item: DeliveryItem, accepted: set[str]) -> InstanceStatus:
        def status(st: str, code: int | None, msg: str | None, transient: bool) -> InstanceStatus:
            return InstanceStatus(item.sop_instance_uid, item.sop_class_uid, st, code, msg, transient)

        if item.sop_class_uid not in accepted:
            return status("refused", SOP_CLASS_NOT_SUPPORTED, "status 0x0122: SCP rejected the presentation context (SOP Class not supported)", False)
        if not assoc.is_established:
            return status("error", None, "association lost before sending", True)
        try:
            rsp = assoc.send_c_store(dcmread(str(item.path)))
        except (ValueError, RuntimeError, OSError) as exc:
            return status("error", None, f"C-STORE not sent: {exc}", True)
        code = rsp.get("Status") if rsp is not None else None
        if code is None:
            return status("error", None, "no C-STORE response (connection lost or timed out)", True)
        code = int(code)
        comment = str(rsp.get("ErrorComment", "") or "")
        text = f"C-STORE status {code:#06x}" + (f" ({comment})" if comment else "")
        if code == 0x0000:
            return status("success", code, None, False)
        if code == 0x0001 or (code & 0xF000) == 0xB000:
            return status("success", code, text, False)
        if dimse_status_is_transient(code):
            return status("error", code, text + ": out of resources", True)
        return status("refused", code, text + ": refused", False)

    def _tls_failure(self, tls_args: tuple[ssl.SSLContext, str], *, connected: bool) -> DeliveryResult | None:
        """Why an association over TLS failed, when TLS is the reason (else None)."""
        s = self.settings
        where = f"{s.ae_title}@{s.host}:{s.port}"
        exc = diagnose_tls(s.host, s.port, tls_args, s.timeout)
        if isinstance(exc, ssl.SSLError):
            log.warning("destination %s: TLS handshake with %s failed: %s", s.name, where, exc)
            return DeliveryResult(error=f"TLS handshake with {where} failed: {exc}", transient=False)
        if exc is not None and not connected:
            return DeliveryResult(error=f"cannot connect to {where} over TLS ({exc})", transient=True)
        return None

    def _not_established(self, assoc: Any, seen: dict[str, Any], items: Sequence[DeliveryItem]) -> DeliveryResult:
        where = f"{self.settings.ae_title}@{self.settings.host}:{self.settings.port}"
        rsp = seen.get("assoc_rsp")
        if assoc.is_rejected and rsp is not None:
            result = int(rsp.result)
            reason = f"association rejected by {where}: {rsp.result_str}, {rsp.source_str}, {rsp.reason_str}"
            # 0x01 rejected-permanent, 0x02 rejected-transient
            return DeliveryResult(error=reason, status_code=None, transient=result == 0x02)
        if rsp is not None and int(getattr(rsp, "result", 1)) == 0x00:
            # Every context rejected: no SOP Class of ours is supported.
            msg = f"status 0x0122: {where} accepted none of the proposed presentation contexts"
            return DeliveryResult(instances=[
                InstanceStatus(i.sop_instance_uid, i.sop_class_uid, "refused", SOP_CLASS_NOT_SUPPORTED, msg, False)
                for i in items
            ])
        if not seen.get("connected"):
            return DeliveryResult(error=f"cannot connect to {where} (refused or unreachable)", transient=True)
        return DeliveryResult(error=f"association with {where} aborted or timed out", transient=True)
