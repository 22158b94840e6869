"""FastAPI application factory.

Routers (one per resource):

* ``/dicomweb`` -- STOW-RS (:mod:`pacs_node.ingest.stow`), WADO-RS
  (:mod:`pacs_node.api.wado`) and QIDO-RS (:mod:`pacs_node.api.qido`)
* ``/api/v1/jobs`` -- :mod:`pacs_node.api.jobs`
* ``/api/v1/studies`` -- :mod:`pacs_node.api.studies`
* ``/api/v1/session`` (dashboard login) -- :mod:`pacs_node.api.session`
* ``/healthz``, ``/livez`` -- :mod:`pacs_node.api.health`
* ``/metrics`` -- :mod:`pacs_node.api.metrics`
* ``/``, ``/login``, ``/jobs/{id}``, key images, ``/static`` -- :mod:`pacs_node.api.dashboard`

Every route that serves or accepts patient data requires a token with a scope
(:mod:`pacs_node.api.auth`; the list per route is in docs/security.md).

OpenAPI is published at ``/openapi.json`` with the interactive docs at ``/docs``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import pacs_node
from pacs_node.api.auth import AuthState
from pacs_node.node import Node
from pacs_node.queue import Dispatcher

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(node: Node, *, dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the HTTP application around an assembled :class:`Node`.

    Parameters
    ----------
    node:
        The node (settings, database, storage, ingestor).
    dispatcher:
        Enqueues tasks (retry, analyze). ``None``: a
        :class:`~pacs_node.queue.CeleryDispatcher` on the configured broker is
        built on first use and closed when the application shuts down.

    Returns
    -------
    FastAPI
        The application (``app.state.node``, ``app.state.dispatcher``).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if getattr(app.state, "owns_dispatcher", False):
            close = getattr(app.state.dispatcher, "close", None)
            if close is not None:
                close()
            app.state.dispatcher = None
            app.state.owns_dispatcher = False

    app = FastAPI(
        title="pacs-node",
        version=pacs_node.__version__,
        description=(
            "PACS-integrated anomaly detection node: DICOMweb ingest, job API, health, metrics and dashboard. "
            "Patient-data endpoints need `Authorization: Bearer <token>` of a `[[http.tokens]]` entry "
            "with the scope they name (read: WADO-RS, QIDO-RS and GET /api/v1; write: STOW-RS, retry, analyze; "
            "admin implies both), or the dashboard's session cookie."
        ),
        lifespan=lifespan,
    )
    app.state.node = node
    app.state.dispatcher = dispatcher
    app.state.owns_dispatcher = False
    app.state.auth = AuthState.from_settings(node.settings.http)

    from pacs_node.api import dashboard, health, jobs, metrics, session, studies
    from pacs_node.api.qido import router as qido_router
    from pacs_node.api.wado import router as wado_router
    from pacs_node.ingest.stow import router as stow_router

    app.include_router(stow_router)
    app.include_router(wado_router)
    app.include_router(qido_router)
    app.include_router(jobs.router)
    app.include_router(studies.router)
    app.include_router(session.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    origins = node.settings.http.cors_allow_origins
    if origins:
        # A viewer on another origin (OHIF) sends Authorization itself; no
        # cookies cross origins (the dashboard's session stays same-origin).
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["X-Total-Count", "Warning", "Content-Location"],
            max_age=600,
        )
    return app
