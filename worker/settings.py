"""``[worker]`` settings: how a worker reaches the study and its models.

Keys (TOML ``[worker]`` table, all optional)::

    storage     = "shared"      # "shared": read the node's storage directory;
                                # "remote": fetch over WADO-RS from node_url (no shared disk)
    node_url    = "http://127.0.0.1:8080"   # the node's HTTP address (remote mode)
    node_token  = ""            # bearer token for the node's API (remote mode)
    outputs_dir = ""            # where outputs are written; "" = <data dir>/outputs
    profiles    = {}            # model profile -> checkpoint path, e.g. { brain = "/models/brain.pt" };
                                # the "default" profile is [engine] model
    pre_inference_delay_seconds = 0.0  # pause before inference (failure drills and tests)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pacs_node.config import Settings

__all__ = ["WorkerSettings"]


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage: Literal["shared", "remote"] = "shared"
    node_url: str = "http://127.0.0.1:8080"
    node_token: str = ""
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
        return ws

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
