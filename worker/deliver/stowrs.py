"""STOW-RS delivery (httpx): one ``multipart/related; type="application/dicom"``
POST of all files to ``{url}/studies`` per attempt.

The response (PS3.18 §10.5.3) gives the outcome of each instance: the Failed
SOP Sequence with a Failure Reason (recorded as the instance's status code),
the Referenced SOP Sequence (stored, perhaps with a Warning Reason). HTTP 200
= all stored, 202 = some failed or warnings, 409 = none stored.

Transient: connection errors, timeouts, HTTP 5xx, 429 and 408, and Failure
Reasons 0xA7xx. Permanent: any other 4xx (e.g. 400, 401, 403, 409 with
refusals) and other Failure Reasons.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from .base import (
    DeliveryItem,
    DeliveryResult,
    Deliverer,
    InstanceStatus,
    dimse_status_is_transient,
    http_status_is_transient,
    register,
)

__all__ = ["StowDeliverer", "multipart_body"]

log = logging.getLogger(__name__)

_FAILED_SOP = "00081198"
_REFERENCED_SOP = "00081199"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """A ``multipart/related`` body with one ``application/dicom`` part per file."""
    out = bytearray()
    for data in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return bytes(out)


def _value(item: dict[str, Any], tag: str) -> Any:
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


@register("stowrs")
class StowDeliverer(Deliverer):
    """STOW-RS to ``{url}/studies``."""

    def send(self, items: Sequence[DeliveryItem]) -> DeliveryResult:
        s = self.settings
        boundary = f"pacs-node-{uuid.uuid4().hex}"
        body = multipart_body([item.path.read_bytes() for item in items], boundary)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **s.headers,
        }
        if s.token:
            headers["Authorization"] = f"Bearer {s.token}"
        url = f"{s.url}/studies"
        try:
            with httpx.Client(timeout=s.timeout, verify=s.verify_tls) as client:
                rsp = client.post(url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return DeliveryResult(error=f"STOW-RS to {url} timed out ({type(exc).__name__})", transient=True)
        except httpx.TransportError as exc:
            return DeliveryResult(error=f"cannot reach {url}: {type(exc).__name__}: {exc}", transient=True)
        return self._result(rsp, items)

    def _result(self, rsp: httpx.Response, items: Sequence[DeliveryItem]) -> DeliveryResult:
        code = rsp.status_code
        failed: dict[str, tuple[int | None, str | None]] = {}
        warned: dict[str, int | None] = {}
        stored: set[str] = set()
        try:
            payload = rsp.json() if rsp.content else {}
        except ValueError:
            payload = {}
        if isinstance(payload, list):
            payload = payload[0] if payload else {}
        if isinstance(payload, dict):
            for it in payload.get(_FAILED_SOP, {}).get("Value", []) or []:
                uid = _value(it, _SOP_INSTANCE)
                if uid:
                    reason = _value(it, _FAILURE_REASON)
                    failed[str(uid)] = (int(reason) if reason is not None else None, None)
            for it in payload.get(_REFERENCED_SOP, {}).get("Value", []) or []:
                uid = _value(it, _SOP_INSTANCE)
                if uid:
                    stored.add(str(uid))
                    w = _value(it, _WARNING_REASON)
                    warned[str(uid)] = int(w) if w is not None else None

        result = DeliveryResult(status_code=code)
        if code not in (200, 202, 409) and not failed and not stored:
            transient = http_status_is_transient(code)
            result.error = f"HTTP {code} {rsp.reason_phrase}: {rsp.text[:200]}".strip()
            result.transient = transient
            result.instances = [
                InstanceStatus(i.sop_instance_uid, i.sop_class_uid, "error" if transient else "refused", code,
                               f"HTTP {code}", transient)
                for i in items
            ]
            return result
        for i in items:
            uid = i.sop_instance_uid
            if uid in failed:
                reason, _ = failed[uid]
                transient = reason is not None and dimse_status_is_transient(reason)
                result.instances.append(InstanceStatus(
                    uid, i.sop_class_uid, "error" if transient else "refused", reason,
                    f"HTTP {code}: Failure Reason {reason:#06x}" if reason is not None else f"HTTP {code}: failed",
                    transient,
                ))
            elif uid in stored or code == 200:
                w = warned.get(uid)
                result.instances.append(InstanceStatus(
                    uid, i.sop_class_uid, "success", w if w is not None else code,
                    f"Warning Reason {w:#06x}" if w is not None else None, False,
                ))
            else:
                # Neither listed as stored nor as failed in a 202/409 answer.
                result.instances.append(InstanceStatus(
                    uid, i.sop_class_uid, "refused", code, f"HTTP {code}: not listed as stored", False
                ))
        return result
