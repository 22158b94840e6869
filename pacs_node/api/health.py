"""``/healthz`` (readiness: database, broker, storage, model) and ``/livez``.

``/healthz`` answers 200 when every check passes, else 503; the body always
lists every check::

    {"ok": false, "checks": {"database": {"ok": true, ...},
                             "broker": {"ok": false, "error": "OperationalError"},
                             "storage": {...}, "model": {...}}}

The ``reconcile`` check reports the start-up storage reconciliation and the
number of interrupted studies (:mod:`pacs_node.ingest.reconcile`); it fails
only when row-less files were too many to quarantine.

The model check looks at the engine model file configured in ``[engine]
model`` (exists, readable; size and a sha256 prefix). The node never imports
the worker or torch; it only looks at the file.

``/livez`` is always open; ``/healthz`` is open unless ``http.healthz_access``
names a scope (its answer holds no patient data).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pacs_node.api.auth import Require
from pacs_node.api.deps import get_dispatcher
from pacs_node.ingest.reconcile import reconcile_check
from pacs_node.node import Node

__all__ = ["DEFAULT_MODEL", "check_broker", "check_database", "check_model", "check_storage", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

DEFAULT_MODEL = "./pacs-node-data/models/demo.pt"
Check = dict[str, Any]

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def check_database(node: Node) -> Check:
    """``SELECT 1`` on the node's database.

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    dict
        ``ok``, ``backend`` and ``error`` (class name) on failure.
    """
    out: Check = {"backend": node.db.url.get_backend_name()}
    try:
        node.db.ping()
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        out.update(ok=False, error=exc.__class__.__name__)
    return out


def check_storage(node: Node) -> Check:
    """The storage root is writable and has more than ``storage.min_free_bytes`` free.

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    dict
        ``ok``, ``free_bytes``, ``min_free_bytes``, ``writable``.
    """
    root = node.store.root
    try:
        usage = shutil.disk_usage(root)
    except OSError as exc:
        return {"ok": False, "error": exc.strerror or exc.__class__.__name__}
    writable = os.access(root, os.W_OK)
    minimum = node.settings.storage.min_free_bytes
    return {
        "ok": writable and usage.free > minimum,
        "free_bytes": usage.free,
        "min_free_bytes": minimum,
        "writable": writable,
    }


def check_broker(dispatcher: object) -> Check:
    """The task broker answers (``dispatcher.ping()``).

    Parameters
    ----------
    dispatcher:
        The application's dispatcher; one without ``ping`` (a test double) is
        reported as not checked.

    Returns
    -------
    dict
        ``ok``, ``latency_ms``, ``error`` (class name) on failure.
    """
    ping = getattr(dispatcher, "ping", None)
    if ping is None:
        return {"ok": True, "checked": False}
    start = time.monotonic()
    try:
        ping()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"ok": False, "error": exc.__class__.__name__}
    return {"ok": True, "latency_ms": round((time.monotonic() - start) * 1000, 1)}


def _sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_cache[key] = digest
    return digest


def model_path(node: Node) -> Path:
    """The engine model file configured in ``[engine] model``.

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    Path
        The path as configured (relative paths are relative to the working
        directory, as for the worker).
    """
    return Path(str(node.settings.engine.get("model", DEFAULT_MODEL))).expanduser()


def check_model(node: Node) -> Check:
    """The model file exists and is readable; its size and sha256 prefix.

    Parameters
    ----------
    node:
        The node.

    Returns
    -------
    dict
        ``ok``, ``path``, ``size_bytes``, ``sha256_prefix`` or ``error``.
    """
    path = model_path(node)
    out: Check = {"path": str(path)}
    try:
        st = path.stat()
        if not path.is_file():
            return {**out, "ok": False, "error": "not a file"}
        digest = _sha256(path, st)
    except FileNotFoundError:
        return {**out, "ok": False, "error": "missing"}
    except OSError as exc:
        return {**out, "ok": False, "error": exc.strerror or exc.__class__.__name__}
    return {**out, "ok": True, "size_bytes": st.st_size, "sha256_prefix": digest[:12]}


@router.get(
    "/healthz",
    # http.healthz_access: "open" by default (probes; no patient data in the answer).
    dependencies=[Depends(Require(setting="healthz_access"))],
    summary="Readiness: database, broker, storage and model checks",
    responses={503: {"description": "at least one check failed"}},
)
def healthz(request: Request) -> JSONResponse:
    """Run every check; 200 when all pass, else 503.

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    JSONResponse
        ``{"ok": bool, "checks": {name: {...}}}``.
    """
    node: Node = request.app.state.node
    checks: dict[str, Check] = {
        "database": check_database(node),
        "broker": check_broker(get_dispatcher(request)),
        "storage": check_storage(node),
        "model": check_model(node),
        # Last start-up storage reconciliation, interrupted studies.
        "reconcile": reconcile_check(node),
    }
    ok = all(bool(c.get("ok")) for c in checks.values())
    if not ok:
        failed = sorted(k for k, c in checks.items() if not c.get("ok"))
        logger.warning("health check failed: %s", ", ".join(failed))
    return JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503)


@router.get("/livez", summary="Liveness: the HTTP server answers")
def livez() -> dict[str, bool]:
    """Always ``{"ok": true}`` while the process serves requests (for
    liveness probes that must not restart the node when a dependency is down).

    Returns
    -------
    dict
        ``{"ok": True}``.
    """
    return {"ok": True}
