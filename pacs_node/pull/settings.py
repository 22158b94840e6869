"""The ``[[sources]]`` TOML tables, validated.

A source is an archive the node can *pull* a study from
(``pacs-node analyze UID --source NAME``, ``POST /api/v1/studies/{uid}/analyze``)
and ask which instances a study holds (completeness check)::

    [[sources]]
    name = "orthanc"
    kind = "dimse"                    # or "dicomweb"
    host = "pacs.example.org"
    port = 4242
    ae_title = "ORTHANC"
    # tls = true                      # DICOM TLS: tls_ca, tls_cert, tls_key,
    #                                 # tls_verify_hostname (see pacs_node.dicom_tls)
    # calling_ae_title = "PACSNODE"   # default: [dicom] ae_title
    retrieve = "c-get"                # or "c-move" (to move_destination)
    # move_destination = "PACSNODE"   # default: [dicom] ae_title
    calling_aets = ["ORTHANC"]        # pushes from these AEs come from this source
    verify_completeness = true
    completeness_timeout_seconds = 120

    [[sources]]
    name = "orthanc-web"
    kind = "dicomweb"
    url = "https://orthanc.example.org/dicom-web"   # QIDO-RS / WADO-RS base URL
    token = "..."                                   # Authorization: Bearer ...
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pacs_node.config import check_ae_title as _ae
from pacs_node.config import check_peer_address
from pacs_node.dicom_tls import PeerTLSSettings

__all__ = ["SourceSettings", "find_source", "load_sources"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SourceSettings(PeerTLSSettings):
    """One archive the node pulls from and checks completeness against (the
    ``tls*`` keys: :class:`PeerTLSSettings`, DIMSE sources only)."""

    model_config = {"extra": "forbid"}

    #: Unique name, used by ``--source NAME`` and ``{"source": NAME}``.
    name: str
    kind: Literal["dicomweb", "dimse"]

    # dicomweb
    #: DICOMweb base URL: QIDO-RS ``{url}/studies?...``, WADO-RS ``{url}/studies/{uid}``.
    url: str = ""
    #: Sent as ``Authorization: Bearer <token>``.
    token: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    verify_tls: bool = True

    # dimse
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    ae_title: str = ""
    #: Our AE title towards the source; default: ``[dicom] ae_title``.
    calling_ae_title: str | None = None
    #: ``c-get``: instances come back on the same association;
    #: ``c-move``: the source sends them to ``move_destination`` (the node's SCP).
    retrieve: Literal["c-get", "c-move"] = "c-get"
    #: AE title the source sends C-MOVEd instances to; default: ``[dicom] ae_title``.
    move_destination: str | None = None
    max_pdu_size: int = Field(default=0, ge=0)

    #: Seconds for connecting and for each network operation.
    timeout: float = Field(default=30.0, gt=0)

    # completeness
    #: Calling AE titles whose C-STOREs come from this source.
    calling_aets: list[str] = Field(default_factory=list)
    #: Before analysing a stable study pushed by one of ``calling_aets``, ask
    #: the source which instances it holds and wait until the node has them.
    verify_completeness: bool = False
    #: Longest wait (after the study turned stable) before analysing anyway.
    completeness_timeout_seconds: float = Field(default=120.0, ge=0)
    #: Ask the source at most this often per study while waiting.
    completeness_poll_seconds: float = Field(default=5.0, gt=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("calling_ae_title", "move_destination")
    @classmethod
    def _check_optional_ae(cls, v: str | None) -> str | None:
        return None if v is None else _ae(v)

    @field_validator("ae_title")
    @classmethod
    def _check_called(cls, v: str) -> str:
        return _ae(v) if v else ""

    @field_validator("calling_aets")
    @classmethod
    def _check_calling_aets(cls, v: list[str]) -> list[str]:
        return [_ae(x) for x in v]

    @model_validator(mode="after")
    def _check_kind(self) -> "SourceSettings":
        self.url = check_peer_address(dimse=self.kind == "dimse", host=self.host, ae_title=self.ae_title,
                                      url=self.url, what=f"a {self.kind} source")
        if self.kind != "dimse" and self.tls:
            raise ValueError("tls keys apply to dimse sources; a dicomweb source uses an https:// url "
                             "(and verify_tls)")
        return self

    def describe(self) -> str:
        """Where it is, without secrets (for logs and messages)."""
        if self.kind == "dimse":
            tls = " TLS" if self.tls else ""
            return f"{self.name} (DIMSE{tls} {self.ae_title}@{self.host}:{self.port}, {self.retrieve})"
        return f"{self.name} (DICOMweb {self.url})"

    def http_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


def load_sources(raw: list[dict[str, Any]] | None, default_ae_title: str = "PACSNODE") -> list[SourceSettings]:
    """Validate ``Settings.sources``; fill ``calling_ae_title`` and
    ``move_destination`` from ``[dicom] ae_title``.

    Raises
    ------
    ValueError
        One line naming the source and key at fault, or a duplicate name.
    """
    out: list[SourceSettings] = []
    for i, item in enumerate(raw or []):
        try:
            src = SourceSettings.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            label = item.get("name", i) if isinstance(item, dict) else i
            where = f"sources[{label}]" + (f".{key}" if key else "")
            raise ValueError(f"invalid configuration: {where}: {msg}") from None
        if src.calling_ae_title is None:
            src.calling_ae_title = _ae(default_ae_title)
        if src.move_destination is None:
            src.move_destination = _ae(default_ae_title)
        out.append(src)
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"invalid configuration: sources: duplicate name {dupes[0]!r}")
    return out


def find_source(sources: list[SourceSettings], name: str) -> SourceSettings | None:
    return next((s for s in sources if s.name == name), None)
