"""``[worker]`` settings: how a worker reaches the study and its models.

Keys (TOML ``[worker]`` table, all optional)::

    storage     = "shared"      # "shared": read the node's storage directory;
                                # "remote": fetch over WADO-RS from node_url (no shared disk)
    node_url    = "http://127.0.0.1:8080"   # the node's HTTP address (remote mode)
    node_token  = ""            # the worker's own bearer token for the node (remote mode): a
                                # [[http.tokens]] entry with only the "read" scope (WADO-RS)
    node_verify_tls = true      # verify the node's certificate with an https:// node_url
    node_ca_file = ""           # PEM CA bundle for that (e.g. a hospital CA); "" = system CAs
    outputs_dir = ""            # where outputs are written; "" = <data dir>/outputs
    profiles    = {}            # model profile -> checkpoint path, e.g. { brain = "/models/brain.pt" };
                                # the "default" profile is [engine] model
    pre_inference_delay_seconds = 0.0  # pause before inference (failure drills and tests)
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, FilePath

from pacs_node.config import Settings

__all__ = ["WorkerSettings"]

logger = logging.getLogger(__name__)


def _loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage: Literal["shared", "remote"] = "shared"
    node_url: str = "http://127.0.0.1:8080"
    node_token: str = ""
    node_verify_tls: bool = True
    node_ca_file: FilePath | None = None
    outputs_dir: Path = Path()
    profiles: dict[str, Path] = Field(default_factory=dict)
    pre_inference_delay_seconds: float = Field(default=0.0, ge=0.0)
    engine: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerSettings:
        """Validate ``[worker]`` (raises pydantic.ValidationError naming the key)."""
        ws = cls.model_validate({**settings.worker, "engine": settings.engine})
        if ws.outputs_dir == Path():
            ws.outputs_dir = settings.data_dir / "outputs"
        if ws.storage == "remote" and not ws.node_url:
            raise ValueError("worker.node_url is required with worker.storage = 'remote'")
        if ws.storage == "remote":
            if not ws.node_token:
                logger.warning("worker.node_token is empty: the node refuses WADO-RS without a token "
                               "(give the worker its own token with the read scope)")
            if ws.node_url.startswith("http://") and not _loopback_url(ws.node_url):
                logger.warning("worker.node_url is plain http to another host: the token and the images "
                               "cross the network unencrypted (use https)")
        return ws

    def node_verify(self) -> bool | ssl.SSLContext:
        """``verify`` for httpx requests to ``node_url``.

        Returns
        -------
        bool or ssl.SSLContext
            ``False`` with ``node_verify_tls = false``; a context trusting
            ``node_ca_file`` when set; else ``True`` (the system CAs).

        Raises
        ------
        ssl.SSLError
            When ``node_ca_file`` is not a PEM CA bundle.
        """
        if not self.node_verify_tls:
            return False
        if self.node_ca_file is not None:
            return ssl.create_default_context(cafile=str(self.node_ca_file))
        return True

    def model_for(self, profile: str | None) -> tuple[Path, str, int, str]:
        """Checkpoint path, device, batch size and AMP mode of a profile.

        Raises
        ------
        FileNotFoundError
            Unknown profile.
        """
        from worker.engine.settings import load_engine_settings

        eng = load_engine_settings(raw=self.engine)
        name = profile or "default"
        if name in self.profiles:
            path = self.profiles[name]
        elif name == "default":
            path = eng.model
        else:
            raise FileNotFoundError(f"model profile {name!r} is not configured in [worker] profiles")
        return Path(path), eng.device, eng.batch_size, eng.amp
