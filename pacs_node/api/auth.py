"""Bearer-token authentication of the REST API.

* Mutating endpoints (retry, analyze) always need
  ``Authorization: Bearer <http.api_token>``. When no token is configured they
  answer 403 ``API token not configured`` (a node is never writable without
  one).
* Read endpoints need the token only when ``http.read_requires_token`` is set.
* A missing or wrong token answers 401 with ``WWW-Authenticate: Bearer``.

Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pacs_node.api.deps import NodeDep

__all__ = ["ReadAuth", "WriteAuth", "check_token", "require_read", "require_write"]

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="`http.api_token` of the node configuration")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def check_token(expected: str, credentials: HTTPAuthorizationCredentials | None, client: str) -> None:
    """Raise unless ``credentials`` carry the configured token.

    Parameters
    ----------
    expected:
        The configured token; empty means "not configured".
    credentials:
        The parsed ``Authorization`` header, if any.
    client:
        Client address, for the log line.

    Raises
    ------
    HTTPException
        403 when no token is configured, 401 (with ``WWW-Authenticate``) when
        the token is missing or wrong.
    """
    if not expected:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "API token not configured")
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected.encode("utf-8")):
        logger.warning("rejected API request with a wrong token from %s", client)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def require_write(request: Request, node: NodeDep, credentials: Credentials) -> None:
    """Dependency of mutating endpoints: the token is always required.

    Parameters
    ----------
    request:
        The current request.
    node:
        The node (its ``http.api_token``).
    credentials:
        The ``Authorization`` header.
    """
    check_token(node.settings.http.api_token, credentials, _client(request))


def require_read(request: Request, node: NodeDep, credentials: Credentials) -> None:
    """Dependency of read endpoints: the token is required only when
    ``http.read_requires_token`` is set.

    Parameters
    ----------
    request:
        The current request.
    node:
        The node (its ``http`` settings).
    credentials:
        The ``Authorization`` header.
    """
    if node.settings.http.read_requires_token:
        check_token(node.settings.http.api_token, credentials, _client(request))


WriteAuth = Depends(require_write)
ReadAuth = Depends(require_read)
