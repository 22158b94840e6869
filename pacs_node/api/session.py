"""``/api/v1/session``: the dashboard's login with a token.

A browser cannot attach a bearer header to an ``<img>`` or a link, so the
dashboard's login page (``/login``) exchanges a token for a session:

* ``POST /api/v1/session`` with ``Authorization: Bearer <token>``: opens a
  server-side session and sets the cookie ``pacs_node_session`` (a random
  256-bit id; ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` when
  the request came over HTTPS, ``Max-Age`` = ``http.session_ttl_seconds``).
  The answer holds the session's CSRF token, which the pages send as
  ``X-CSRF-Token`` with every POST.
* ``GET /api/v1/session``: who is logged in (name, scopes, expiry, the CSRF
  token for a session); 401 when nobody is.
* ``DELETE /api/v1/session``: logout (the session ends, the cookie is removed).

The session carries the token's scopes; reads accept the cookie, writes need
the cookie and the CSRF header, or a bearer token (:mod:`pacs_node.api.auth`).
"""

from __future__ import annotations

import datetime as dt
import logging

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel

from pacs_node.api.auth import (
    SESSION_COOKIE,
    BearerCredentials,
    Principal,
    Require,
    SessionCookie,
    auth_state,
    authenticate,
)
from pacs_node.config import TOKEN_SCOPES

__all__ = ["SessionOut", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/session", tags=["session"])
_NO_STORE = {"Cache-Control": "no-store"}


class SessionOut(BaseModel):
    """Who is logged in."""

    #: Name of the token (``anonymous`` with ``http.allow_unauthenticated``).
    name: str
    scopes: list[str]
    #: ``session`` (cookie), ``bearer`` (header) or ``open`` (no check).
    via: str
    expires_at: dt.datetime | None = None
    #: Send as ``X-CSRF-Token`` with unsafe requests of this session.
    csrf_token: str | None = None


def _out(principal: Principal, *, csrf: str | None = None, expires: float | None = None) -> SessionOut:
    return SessionOut(
        name=principal.name,
        scopes=[s for s in TOKEN_SCOPES if s in principal.scopes],
        via=principal.via,
        expires_at=dt.datetime.fromtimestamp(expires, dt.timezone.utc) if expires is not None else None,
        csrf_token=csrf,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionOut,
    responses={401: {"description": "missing or wrong bearer token"}},
    summary="Log in: exchange a bearer token for a session cookie",
)
async def login(request: Request, response: Response, bearer: BearerCredentials, cookie: SessionCookie) -> SessionOut:
    """Open a dashboard session for the token in the ``Authorization`` header.

    Parameters
    ----------
    request:
        The current request.
    response:
        The response (gets the ``Set-Cookie`` header).
    bearer:
        The token.
    cookie:
        A session cookie sent along: that session ends (a login always
        starts a fresh session id).

    Returns
    -------
    SessionOut
        The session, with its CSRF token.

    Raises
    ------
    HTTPException
        401 when the token is missing or wrong.
    """
    principal = authenticate(request, bearer, None)
    response.headers.update(_NO_STORE)
    if principal.via == "open":
        response.status_code = status.HTTP_200_OK
        return _out(principal)
    auth = auth_state(request)
    if cookie:
        auth.sessions.revoke(cookie)
    session_id, session = auth.sessions.create(principal)
    response.set_cookie(
        SESSION_COOKIE, session_id, max_age=int(auth.sessions.ttl), path="/",
        secure=request.url.scheme == "https", httponly=True, samesite="strict",
    )
    logger.info("dashboard session opened for token %r from %s", principal.name,
                request.client.host if request.client else "unknown")
    return _out(session.principal, csrf=session.csrf, expires=session.expires)


@router.get(
    "",
    response_model=SessionOut,
    responses={401: {"description": "not logged in"}},
    summary="Who is logged in (and the session's CSRF token)",
)
def whoami(request: Request, response: Response, cookie: SessionCookie,
           principal: Principal = Depends(Require(None))) -> SessionOut:
    """The principal of the request.

    Parameters
    ----------
    request:
        The current request.
    response:
        The response.
    cookie:
        The session cookie, if any.
    principal:
        The authenticated principal.

    Returns
    -------
    SessionOut
        Name, scopes; the expiry and CSRF token of a session.
    """
    response.headers.update(_NO_STORE)
    if principal.via == "session" and cookie:
        session = auth_state(request).sessions.get(cookie)
        if session is not None:
            return _out(principal, csrf=session.csrf, expires=session.expires)
    return _out(principal)


@router.delete("", status_code=status.HTTP_204_NO_CONTENT, summary="Log out: end the session, remove the cookie")
def logout(request: Request, cookie: SessionCookie) -> Response:
    """End the session of the cookie (if any) and remove the cookie.

    Parameters
    ----------
    request:
        The current request.
    cookie:
        The session cookie, if any.

    Returns
    -------
    Response
        204 with a ``Set-Cookie`` that removes the cookie.
    """
    if cookie and auth_state(request).sessions.revoke(cookie):
        logger.info("dashboard session closed")
    response = Response(status_code=status.HTTP_204_NO_CONTENT, headers=_NO_STORE)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=request.url.scheme == "https",
                           httponly=True, samesite="strict")
    return response
