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

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
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
    max_pdu_size: int = Field(default=0, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    #: Sleep of an association's network loop while data is arriving, in ms
    #: (pynetdicom's 1 ms otherwise); 0 keeps pynetdicom's 1 ms throughout.
    active_poll_ms: float = Field(default=0.1, ge=0, le=1.0)

    @field_validator("ae_title")
    @classmethod
    def _check_title(cls, v: str) -> str:
        return check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, v: list[str]) -> list[str]:
        return [check_ae_title(x) for x in v]


class HttpSettings(BaseModel):
    """HTTP server: REST API, DICOMweb (STOW-RS, WADO-RS) and dashboard."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_request_bytes: int = Field(default=2 * 1024**3, gt=0)
    api_token: str = ""
    read_requires_token: bool = False


class StorageSettings(BaseModel):
    """Where received instances are written."""

    model_config = {"extra": "forbid"}

    root: Path = DEFAULT_DATA_DIR / "storage"
    fsync: bool = True
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0)


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


def load_settings(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate the settings.

    Parameters
    ----------
    config_file:
        TOML file; ``None`` uses ``$PACS_NODE_CONFIG`` when set, else only
        defaults and environment variables.

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
    path = config_file if config_file is not None else os.environ.get("PACS_NODE_CONFIG")
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
