"""One typed settings object for the whole node.

Settings come from, in increasing priority: built-in defaults, a TOML file
(``--config FILE`` or ``PACS_NODE_CONFIG``), and environment variables with the
``PACS_NODE_`` prefix and ``__`` as the nesting separator, for example
``PACS_NODE_DICOM__PORT=11113``.

:func:`load_settings` validates everything at once; :class:`ConfigError`
carries a single line naming the offending key and why it is wrong, which the
entry points print before exiting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, FilePath, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "ConfigError",
    "check_ae_title",
    "check_peer_address",
    "DatabaseSettings",
    "DicomSettings",
    "HttpSettings",
    "HttpToken",
    "IngestSettings",
    "TOKEN_SCOPES",
    "QueueSettings",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "load_settings",
]

DEFAULT_DATA_DIR = Path("./pacs-node-data")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class ConfigError(ValueError):
    """A configuration value is invalid; ``str(err)`` is one line naming the key."""


def check_ae_title(value: str) -> str:
    """Validate an AE title (1-16 printable characters, no backslash); returns it stripped.

    Raises
    ------
    ValueError
        When the title is not valid.
    """
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable characters without backslash")
    return value.strip()


def check_peer_address(*, dimse: bool, host: str, ae_title: str, url: str, what: str) -> str:
    """Check the address of a remote peer (a source or a destination).

    A DIMSE peer needs ``host`` and ``ae_title``; a web peer needs an http(s)
    ``url``, returned without its trailing slash.

    Raises
    ------
    ValueError
        Naming ``what`` (e.g. "a dimse destination") and the missing part.
    """
    if dimse:
        if not host:
            raise ValueError(f"{what} needs host")
        if not ae_title:
            raise ValueError(f"{what} needs ae_title")
        return url
    if not re.match(r"^https?://", url):
        raise ValueError(f"{what} needs url (http:// or https://)")
    return url.rstrip("/")


class DicomSettings(BaseModel):
    """DIMSE service class provider (C-ECHO, C-STORE)."""

    model_config = {"extra": "forbid"}

    ae_title: str = "PACSNODE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    require_called_aet: bool = True
    max_associations: int = Field(default=16, ge=1, le=1000)
    #: Largest P-DATA-TF PDU the node accepts (the Maximum Length it announces);
    #: a longer PDU is answered with A-ABORT. 0 (unlimited) is refused: it would
    #: let a peer make the node buffer a PDU of any size.
    max_pdu_size: int = Field(default=1024 * 1024, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    #: Sleep of an association's network loop while data is arriving, in ms
    #: (pynetdicom's 1 ms otherwise); 0 keeps pynetdicom's 1 ms throughout.
    active_poll_ms: float = Field(default=0.1, ge=0, le=1.0)

    # DICOM TLS (pacs_node.dicom_tls). With tls_cert set, `port` speaks TLS
    # only, unless tls_port is set: then TLS listens on tls_port and plain
    # DICOM stays on port.
    #: PEM certificate (chain) of the SCP.
    tls_cert: FilePath | None = None
    #: PEM private key of tls_cert (unencrypted), unless tls_cert holds it.
    tls_key: FilePath | None = None
    #: PEM CA bundle: when set, every TLS peer must present a client
    #: certificate signed by it (mutual TLS).
    tls_ca: FilePath | None = None
    #: Separate TLS port (DICOM's registered port is 2762); None: `port` is TLS.
    tls_port: int | None = Field(default=None, ge=0, le=65535)

    # Network limits (pacs_node.ingest.guard): each refusal is logged and
    # answered with A-ASSOCIATE-RJ, A-ABORT or a C-STORE failure status.
    #: Largest A-ASSOCIATE-RQ accepted (bytes); a longer one is aborted right
    #: after its 6-byte header. 128 presentation contexts take a few KiB.
    max_associate_rq_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: Seconds from TCP accept to a complete A-ASSOCIATE-RQ (TLS handshake
    #: included); a connection that takes longer is closed.
    pre_association_timeout: float = Field(default=5.0, gt=0, le=600)
    #: Simultaneous connections from one IP address (0 = no limit); more are
    #: answered A-ASSOCIATE-RJ "local limit exceeded".
    max_connections_per_peer: int = Field(default=4, ge=0, le=1000)
    #: Largest data set accepted in one C-STORE (bytes); a larger one is read
    #: to its end without being kept and answered 0xA700.
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1024)

    @field_validator("ae_title")
    @classmethod
    def _check_title(cls, v: str) -> str:
        return check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, v: list[str]) -> list[str]:
        return [check_ae_title(x) for x in v]

    @field_validator("max_pdu_size")
    @classmethod
    def _check_pdu(cls, v: int) -> int:
        if not 4096 <= v <= 64 * 1024 * 1024:
            raise ValueError("must be 4096-67108864 bytes (0, unlimited, would let a peer send PDUs of any size)")
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> "DicomSettings":
        if self.tls_cert is None and (self.tls_key or self.tls_ca or self.tls_port is not None):
            raise ValueError("tls_key, tls_ca and tls_port need tls_cert")
        if self.tls_port is not None and self.tls_port != 0 and self.tls_port == self.port:
            raise ValueError("tls_port must differ from port (leave it unset to make port TLS-only)")
        return self


#: Scopes of an HTTP token: ``read`` (WADO-RS, the job/study API, key images),
#: ``write`` (STOW-RS, retry, analyze), ``admin`` (everything, and the
#: endpoints configured as ``admin``). See docs/security.md.
TOKEN_SCOPES = ("read", "write", "admin")
_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class HttpToken(BaseModel):
    """One ``[[http.tokens]]`` entry: a bearer token, stored only as its hash
    (``pacs-node token create`` prints a new token and this table)."""

    model_config = {"extra": "forbid"}

    #: Who holds the token (logged with each write; not secret).
    name: str
    #: Hex SHA-256 of the token's UTF-8 bytes. Tokens are 256-bit random
    #: values, so a plain hash is enough (no slow KDF: nothing to brute-force).
    sha256: str
    #: Subset of ``read``, ``write``, ``admin`` (admin implies the others).
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _TOKEN_NAME_RE.match(v):
            raise ValueError("must be 1-64 characters: letters, digits, '_', '.', '@', '-'")
        return v

    @field_validator("sha256")
    @classmethod
    def _check_hash(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be the 64 hex digits of the token's SHA-256 (pacs-node token create)")
        return v

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, v: list[str]) -> list[str]:
        return sorted(set(v), key=TOKEN_SCOPES.index)


class HttpSettings(BaseModel):
    """HTTP server: REST API, DICOMweb (STOW-RS, WADO-RS) and dashboard.

    Authentication (pacs_node.api.auth, docs/security.md): every endpoint that
    serves or accepts patient data needs a token of ``tokens`` (bearer header,
    or the dashboard's session cookie).
    """

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_request_bytes: int = Field(default=2 * 1024**3, gt=0)
    #: Bearer tokens, as hashes; none configured: every patient-data endpoint
    #: answers 401 (and ``serve`` refuses a non-loopback ``host``).
    tokens: list[HttpToken] = Field(default_factory=list)
    #: Serve patient data without any token (the check is off). Only for a
    #: reverse proxy that authenticates every request itself, or a closed test
    #: bench; also lets ``serve`` start on a non-loopback host without tokens.
    allow_unauthenticated: bool = False
    #: Who may read /metrics and /healthz: "open" (no token), "read" or
    #: "admin" (a token with that scope). /livez is always open.
    metrics_access: Literal["open", "read", "admin"] = "read"
    healthz_access: Literal["open", "read", "admin"] = "open"
    #: Lifetime of a dashboard session (login with a token -> HttpOnly cookie).
    session_ttl_seconds: float = Field(default=8 * 3600.0, ge=60, le=7 * 24 * 3600.0)
    #: HTTPS: PEM certificate (chain) and its key; both or neither.
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    #: PEM CA bundle: when set, every HTTPS client must present a certificate
    #: signed by it (mutual TLS), in addition to its token.
    tls_ca: FilePath | None = None
    #: Addresses of reverse proxies whose X-Forwarded-For / -Proto headers are
    #: trusted (client address in logs, https for the Secure cookie flag).
    forwarded_allow_ips: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    #: Link "open in viewer" of the dashboard: an http(s) URL template where
    #: ``{study_uid}`` is replaced by the URL-encoded Study Instance UID, e.g.
    #: "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}".
    #: None: no link.
    viewer_url: str | None = None
    #: Origins (scheme://host[:port]) of browser apps allowed to call the
    #: DICOMweb and API endpoints cross-origin (CORS), e.g. an OHIF served
    #: from another host. Empty: none (same origin only). Tokens still apply:
    #: CORS only lets the browser send them.
    cors_allow_origins: list[str] = Field(default_factory=list)

    @field_validator("cors_allow_origins")
    @classmethod
    def _check_origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin == "*":
                raise ValueError("cors_allow_origins: name each origin; '*' would let any web page use a token")
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"cors_allow_origins: {origin!r} is not scheme://host[:port]")
        return v

    @model_validator(mode="after")
    def _check_http(self) -> "HttpSettings":
        if self.viewer_url is not None:
            if not self.viewer_url.lower().startswith(("http://", "https://")):
                raise ValueError("viewer_url must be an http:// or https:// URL")
            if "{study_uid}" not in self.viewer_url:
                raise ValueError("viewer_url must contain {study_uid}")
        if self.allow_unauthenticated and self.tokens:
            raise ValueError("allow_unauthenticated cannot be combined with tokens (tokens would not be checked)")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("tokens: names must be unique")
        if len({t.sha256 for t in self.tokens}) != len(self.tokens):
            raise ValueError("tokens: the same token is configured twice")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (client certificates) needs tls_cert and tls_key")
        return self


class StorageSettings(BaseModel):
    """Where received instances are written."""

    model_config = {"extra": "forbid"}

    root: Path = DEFAULT_DATA_DIR / "storage"
    fsync: bool = True
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0)
    # Start-up reconciliation (pacs_node.ingest.reconcile): delete leftover
    # .incoming-*.tmp files, quarantine files without an instances row into
    # <root>/.quarantine/, report rows whose file is missing. Runs before the
    # DICOM SCP accepts; `pacs-node storage reconcile` runs it by hand.
    reconcile_on_start: bool = True
    # Files modified less than this many seconds ago are left alone (another
    # process may be writing them); looked at again once, after this delay.
    reconcile_grace_seconds: float = Field(default=60.0, ge=0)
    # More row-less files than this means the database and the storage root
    # do not belong together: nothing is moved, /healthz reports it.
    quarantine_limit: int = Field(default=1000, ge=0)


class IngestSettings(BaseModel):
    """Checks on the content of every received instance, the same for DIMSE
    C-STORE and STOW-RS parts (:mod:`pacs_node.ingest.validate`); limits of
    STOW-RS requests (:mod:`pacs_node.ingest.stow`).

    The largest instance accepted is ``dicom.max_instance_bytes`` for both
    front ends (0xA700 over DIMSE, Failure Reason 0xA700 for a STOW-RS part);
    the largest STOW-RS request is ``http.max_request_bytes`` (413).
    """

    model_config = {"extra": "forbid"}

    #: Decode check at receive. "structure": header and pixel data structure
    #: (lengths against Rows x Columns x Samples x Frames x Bits, fragments,
    #: frame count, codestream markers), without decoding; "full": also
    #: decodes every compressed frame with the installed pydicom decoders (an
    #: instance is refused only when a decoder exists and fails); "off": the
    #: header is still read and checked, pixel data is not. A failure is
    #: answered 0xC210 with an Error Comment.
    decode_check: Literal["structure", "full", "off"] = "structure"
    #: Largest size (bytes) a deflated data set may inflate to; it is inflated
    #: in bounded steps and refused with 0xA700 as soon as it grows past this
    #: (so a deflate bomb costs at most this much memory). Deflate is used for
    #: SR and small objects; raise it for large deflated images.
    max_inflated_bytes: int = Field(default=64 * 1024**2, ge=1024**2)
    #: Most parts in one STOW-RS request; the request is refused with 413 at
    #: the next part (the parts before it are stored and listed).
    stow_max_parts: int = Field(default=10_000, ge=1, le=10_000_000)
    #: Seconds a STOW-RS request may go without sending body bytes (a
    #: Content-Length larger than the body, a stalled client); then 408.
    stow_read_timeout: float = Field(default=60.0, gt=0, le=3600)


class DatabaseSettings(BaseModel):
    """SQL database (SQLAlchemy URL)."""

    model_config = {"extra": "forbid"}

    url: str = f"sqlite:///{(DEFAULT_DATA_DIR / 'pacs-node.db').as_posix()}"
    echo: bool = False
    auto_upgrade: bool = True

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(v)
        except Exception as exc:  # noqa: BLE001 - re-raised as a config error
            raise ValueError(f"not a SQLAlchemy URL ({exc})") from None
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError("only sqlite and postgresql are supported")
        return v


class QueueSettings(BaseModel):
    """Task queue (Celery broker)."""

    model_config = {"extra": "forbid"}

    broker_url: str = "embedded"
    result_backend: str = ""
    gpu_queue: str = "gpu"
    io_queue: str = "io"
    start_worker: bool = True
    # A running job holds a lease the worker renews every heartbeat; when it
    # expires (worker killed, host lost) the node queues the job again.
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # Soft / hard time limits of the GPU task (seconds).
    task_soft_time_limit: float = Field(default=1800.0, gt=0)
    task_time_limit: float = Field(default=2100.0, gt=0)
    # Worker concurrency per process (1 per GPU for the gpu queue).
    worker_concurrency: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check_lease(self) -> "QueueSettings":
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be smaller than lease_seconds")
        return self


class StudySettings(BaseModel):
    """When a study counts as complete."""

    model_config = {"extra": "forbid"}

    stable_seconds: float = Field(default=10.0, gt=0)
    force_complete_seconds: float = Field(default=600.0, gt=0)
    required_series: list[str] = Field(default_factory=list)
    required_series_quiet_seconds: float = Field(default=2.0, ge=0)
    scheduler_interval_seconds: float = Field(default=1.0, gt=0)

    @field_validator("required_series")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _check_force(self) -> "StudySettings":
        if self.force_complete_seconds < self.stable_seconds:
            raise ValueError("force_complete_seconds must be >= stable_seconds")
        return self


class LoggingSettings(BaseModel):
    model_config = {"extra": "forbid"}

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class Settings(BaseSettings):
    """Every setting of the node, validated at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    # Sections owned by later pipeline steps; validated by their own models
    # where they are used, kept here so one file configures everything.
    engine: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    destinations: list[dict[str, Any]] = Field(default_factory=list)
    sources: list[dict[str, Any]] = Field(default_factory=list)
    routing: list[dict[str, Any]] = Field(default_factory=list)
    worker: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = os.environ.get("_PACS_NODE_TOML_FILE")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def data_dir(self) -> Path:
        """Directory for node-owned state besides storage (queue, models)."""
        return self.storage.root.resolve().parent


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(err.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"invalid configuration: {key}: {msg}{suffix}"


#: Looked for, in this order, when neither ``--config`` nor
#: ``$PACS_NODE_CONFIG`` names a file (README "Configuration").
DEFAULT_CONFIG_FILES = (Path("pacs-node.toml"), Path("/etc/pacs-node/pacs-node.toml"))


def resolve_config_file(config_file: str | os.PathLike[str] | None = None) -> Path | None:
    """The configuration file ``serve`` and every other command read:
    ``config_file`` (``--config``), else ``$PACS_NODE_CONFIG``, else the first
    of :data:`DEFAULT_CONFIG_FILES` that exists, else None (built-in defaults
    and environment variables only)."""
    named = config_file if config_file is not None else os.environ.get("PACS_NODE_CONFIG")
    if named:
        return Path(named)
    return next((p for p in DEFAULT_CONFIG_FILES if p.is_file()), None)


def load_settings(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate the settings.

    Parameters
    ----------
    config_file:
        TOML file; ``None`` uses ``$PACS_NODE_CONFIG`` when set, else the
        first of :data:`DEFAULT_CONFIG_FILES` that exists, else only defaults
        and environment variables (:func:`resolve_config_file`).

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        When the file cannot be read or a value is invalid; the message is one
        line naming the key.
    """
    path = resolve_config_file(config_file)
    previous = os.environ.pop("_PACS_NODE_TOML_FILE", None)
    try:
        if path:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"invalid configuration: config file {p} does not exist")
            import tomllib

            try:
                tomllib.loads(p.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"invalid configuration: {p} is not valid TOML: {exc}") from None
            os.environ["_PACS_NODE_TOML_FILE"] = str(p)
        try:
            return Settings()
        except ValidationError as exc:
            raise ConfigError(_format_error(exc)) from None
    finally:
        os.environ.pop("_PACS_NODE_TOML_FILE", None)
        if previous is not None:
            os.environ["_PACS_NODE_TOML_FILE"] = previous
