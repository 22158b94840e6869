"""The :class:`Deliverer` interface, result types, and the registry by ``kind``."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .settings import DestinationSettings

__all__ = [
    "DeliveryItem",
    "DeliveryResult",
    "Deliverer",
    "InstanceStatus",
    "dimse_status_is_transient",
    "http_status_is_transient",
    "make_deliverer",
    "register",
]


@dataclass(frozen=True)
class DeliveryItem:
    """One file to send."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    kind: str = ""


@dataclass
class InstanceStatus:
    """Outcome for one instance.

    Attributes
    ----------
    status:
        ``success`` (stored, possibly with a warning status), ``refused``
        (the peer said no) or ``error`` (not sent / no answer).
    status_code:
        DIMSE status (C-STORE) or Failure/Warning Reason (STOW-RS); ``None``
        when there was no answer.
    transient:
        Retrying may help (out of resources, connection lost...).
    """

    sop_instance_uid: str
    sop_class_uid: str
    status: str
    status_code: int | None = None
    message: str | None = None
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass
class DeliveryResult:
    """Outcome of one attempt to one destination.

    ``error``/``status_code``/``transient`` describe a failure of the whole
    attempt (connection refused, association rejected, HTTP error...);
    ``instances`` the outcome of each instance that got an answer.
    """

    instances: list[InstanceStatus] = field(default_factory=list)
    error: str | None = None
    status_code: int | None = None
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.instances) and all(i.ok for i in self.instances)

    @property
    def status(self) -> str:
        """``success``, ``partial`` (some instances stored, some not), ``refused`` or ``error``."""
        if self.ok:
            return "success"
        if any(i.ok for i in self.instances):
            return "partial"
        if self.instances:
            return "refused" if all(i.status == "refused" for i in self.instances) else "error"
        return "error" if self.transient else "refused"

    @property
    def retryable(self) -> bool:
        """Whether a retry may deliver what is still missing."""
        if self.ok:
            return False
        if not self.instances:
            return self.transient
        return any(i.transient for i in self.instances if not i.ok)

    def summary_code(self) -> int | None:
        """The attempt's status code: the attempt-level code, else the first failing instance's, else 0/200."""
        if self.status_code is not None:
            return self.status_code
        for i in self.instances:
            if not i.ok and i.status_code is not None:
                return i.status_code
        return self.instances[0].status_code if self.instances else None

    def details(self) -> dict[str, Any]:
        """JSON for ``delivery_attempts.details``."""
        return {
            "instances": [
                {k: v for k, v in asdict(i).items() if v is not None} for i in self.instances
            ],
        }


def dimse_status_is_transient(status: int) -> bool:
    """0xA7xx (out of resources) is transient; refusals (0xA9xx, 0xCxxx, 0x01xx...) are not."""
    return 0xA700 <= status <= 0xA7FF


def http_status_is_transient(code: int) -> bool:
    """5xx, 429 (too many requests) and 408 (request timeout) are transient."""
    return code >= 500 or code in (408, 429)


class Deliverer(abc.ABC):
    """Sends files to one destination. Implementations register by ``kind``."""

    kind: ClassVar[str]

    def __init__(self, settings: DestinationSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def send(self, items: Sequence[DeliveryItem]) -> DeliveryResult:
        """Send ``items`` in one attempt; never raises for network or peer failures."""


_REGISTRY: dict[str, type[Deliverer]] = {}


def register(kind: str) -> Callable[[type[Deliverer]], type[Deliverer]]:
    """Class decorator: make ``cls`` the deliverer of ``kind``."""

    def deco(cls: type[Deliverer]) -> type[Deliverer]:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def make_deliverer(settings: DestinationSettings) -> Deliverer:
    """The deliverer for ``settings.kind``.

    Raises
    ------
    ValueError
        Unknown kind.
    """
    from . import dimse, stowrs  # noqa: F401 - registration side effect

    try:
        cls = _REGISTRY[settings.kind]
    except KeyError:
        raise ValueError(f"unknown destination kind {settings.kind!r}") from None
    return cls(settings)
