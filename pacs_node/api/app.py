"""FastAPI application factory."""

from __future__ import annotations

import logging
import shutil

from fastapi import FastAPI
from fastapi.responses import JSONResponse

import pacs_node
from pacs_node.node import Node

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(node: Node, *, dispatcher: object | None = None) -> FastAPI:
    """Build the HTTP application around an assembled :class:`Node`."""
    app = FastAPI(
        title="pacs-node",
        version=pacs_node.__version__,
        description="PACS-integrated anomaly detection node: DICOMweb ingest, job API.",
    )
    app.state.node = node
    app.state.dispatcher = dispatcher

    from pacs_node.ingest.stow import router as stow_router

    app.include_router(stow_router)
    from pacs_node.api.wado import router as wado_router

    app.include_router(wado_router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        checks: dict[str, dict[str, object]] = {}
        try:
            node.db.ping()
            checks["database"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["database"] = {"ok": False, "error": exc.__class__.__name__}
        try:
            usage = shutil.disk_usage(node.store.root)
            checks["storage"] = {"ok": usage.free > node.settings.storage.min_free_bytes, "free_bytes": usage.free}
        except OSError as exc:
            checks["storage"] = {"ok": False, "error": str(exc)}
        ok = all(bool(c["ok"]) for c in checks.values())
        return JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503)

    return app
