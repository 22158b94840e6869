"""The ``[[destinations]]`` TOML tables, validated.

::

    [[destinations]]
    name = "pacs"
    kind = "dimse"            # or "stowrs"
    host = "pacs.example.org"
    port = 104
    ae_title = "PACS"
    # calling_ae_title = "PACSNODE"   # default: [dicom] ae_title
    # DICOM TLS (pacs_node.dicom_tls.PeerTLSSettings), e.g. port = 2762:
    # tls = true
    # tls_ca = "/etc/pacs-node/tls/hospital-ca.pem"   # default: system trust store
    # tls_cert = "/etc/pacs-node/tls/node.pem"        # client certificate, when the
    # tls_key = "/etc/pacs-node/tls/node.key"         #   archive requires one
    storage_commitment = "auto"       # false (default) | true | "auto"
    commitment_timeout = 60.0

    [[destinations]]
    name = "orthanc-web"
    kind = "stowrs"
    url = "https://orthanc.example.org/dicom-web"   # POST {url}/studies
    token = "..."                                   # Authorization: Bearer ...
    headers = { "X-Tenant" = "radiology" }
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pacs_node.config import check_ae_title as _ae
from pacs_node.config import check_peer_address
from pacs_node.dicom_tls import PeerTLSSettings

__all__ = ["DestinationSettings", "load_destinations"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class DestinationSettings(PeerTLSSettings):
    """One destination archive (the ``tls*`` keys: :class:`PeerTLSSettings`,
    DIMSE destinations only)."""

    model_config = {"extra": "forbid"}

    #: Unique name, recorded in ``delivery_attempts.destination``.
    name: str
    kind: Literal["dimse", "stowrs"]
    enabled: bool = True

    # dimse
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    ae_title: str = ""
    #: Our AE title; default: ``[dicom] ae_title``.
    calling_ae_title: str | None = None
    max_pdu_size: int = Field(default=0, ge=0)

    # stowrs
    #: DICOMweb base URL; instances are POSTed to ``{url}/studies``.
    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    #: Sent as ``Authorization: Bearer <token>``.
    token: str = ""
    verify_tls: bool = True

    #: Seconds for connecting and for each network operation.
    timeout: float = Field(default=30.0, gt=0)
    #: Storage Commitment Push Model after a DIMSE delivery (N-ACTION, then the
    #: N-EVENT-REPORT on the same association or one the archive opens to the
    #: node's SCP): false = never ask; "auto" = ask, and a destination that does
    #: not support it is recorded "not_supported" (the delivery still succeeds);
    #: true = required (not supported fails the delivery). With either, instances
    #: still failed or unanswered after max_attempts requests fail the delivery.
    storage_commitment: Literal[False, True, "auto"] = False
    #: Seconds to wait for the N-EVENT-REPORT after the N-ACTION was accepted.
    commitment_timeout: float = Field(default=60.0, gt=0)

    #: Attempts per delivery (1 = no retry); also per storage commitment.
    max_attempts: int = Field(default=5, ge=1, le=100)
    #: Wait before retry n (n ≥ 1): backoff_seconds * 2**(n-1), at most max_backoff_seconds.
    backoff_seconds: float = Field(default=2.0, ge=0)
    max_backoff_seconds: float = Field(default=300.0, ge=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("calling_ae_title")
    @classmethod
    def _check_calling(cls, v: str | None) -> str | None:
        return None if v is None else _ae(v)

    @field_validator("ae_title")
    @classmethod
    def _check_called(cls, v: str) -> str:
        return _ae(v) if v else ""

    @model_validator(mode="after")
    def _check_kind(self) -> "DestinationSettings":
        self.url = check_peer_address(dimse=self.kind == "dimse", host=self.host, ae_title=self.ae_title,
                                      url=self.url, what=f"a {self.kind} destination")
        if self.kind != "dimse" and self.tls:
            raise ValueError("tls keys apply to dimse destinations; a stowrs destination uses an https:// url "
                             "(and verify_tls)")
        if self.storage_commitment is not False and self.kind != "dimse":
            raise ValueError("storage_commitment needs a dimse destination (it is a DIMSE service)")
        return self

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        return float(min(self.backoff_seconds * 2 ** max(retry - 1, 0), self.max_backoff_seconds))

    def describe(self) -> str:
        """Where it goes, without secrets (for logs)."""
        if self.kind == "dimse":
            return f"{self.name} (DIMSE{' TLS' if self.tls else ''} {self.ae_title}@{self.host}:{self.port})"
        return f"{self.name} (STOW-RS {self.url})"


def load_destinations(raw: list[dict[str, Any]] | None, default_calling_ae_title: str = "PACSNODE") -> list[DestinationSettings]:
    """Validate ``Settings.destinations``; fill ``calling_ae_title`` from ``[dicom] ae_title``.

    Raises
    ------
    ValueError
        One line naming the destination and key at fault, or a duplicate name.
    """
    out: list[DestinationSettings] = []
    for i, item in enumerate(raw or []):
        try:
            dest = DestinationSettings.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(table)"
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
            label = item.get("name", i) if isinstance(item, dict) else i
            raise ValueError(f"invalid configuration: destinations[{label}].{key}: {msg}") from None
        if dest.kind == "dimse" and dest.calling_ae_title is None:
            dest.calling_ae_title = _ae(default_calling_ae_title)
        out.append(dest)
    names = [d.name for d in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"invalid configuration: destinations: duplicate name {dupes[0]!r}")
    return out
