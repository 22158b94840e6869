"""Authentication of the HTTP server: bearer tokens with scopes, and the
dashboard's session cookie.

Tokens are configured as ``[[http.tokens]]`` tables holding only the SHA-256
of the token (``pacs-node token create`` makes one). Every route that serves
or accepts patient data declares the scope it needs:

* ``read``: WADO-RS, QIDO-RS, ``GET /api/v1/*``, key images (and ``/metrics`` by
  default, ``http.metrics_access``);
* ``write``: STOW-RS, ``POST /api/v1/jobs/{id}/retry``,
  ``POST /api/v1/studies/{uid}/analyze``;
* ``admin``: implies ``read`` and ``write``; required by the endpoints
  configured as ``"admin"`` (``http.metrics_access``, ``http.healthz_access``).

Credentials, in this order:

1. ``Authorization: Bearer <token>``: compared (as its SHA-256, with
   :func:`hmac.compare_digest`, against every configured hash) in constant
   time. A present but wrong token answers 401 even when a cookie is sent.
2. The session cookie ``pacs_node_session`` set by ``POST /api/v1/session``
   (:mod:`pacs_node.api.session`): a random id naming a server-side session
   (token name, scopes, expiry). With an unsafe method (POST, PUT, PATCH,
   DELETE) the request must also carry ``X-CSRF-Token`` with the session's
   CSRF token (a cross-site page can neither read it nor set the header).

Answers: 401 with ``WWW-Authenticate: Bearer`` when there is no valid
credential (also when no token is configured at all), 403 when the token
lacks the scope or the CSRF token is missing. With
``http.allow_unauthenticated`` the check is off (documented override).

Tokens are never logged; a refusal is logged with the route template (never
the concrete path, which holds UIDs), the client address and the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from pacs_node.config import TOKEN_SCOPES, HttpSettings, HttpToken

__all__ = [
    "AdminAuth",
    "AuthState",
    "CSRF_HEADER",
    "Principal",
    "ReadAuth",
    "Require",
    "SESSION_COOKIE",
    "SessionStore",
    "TokenStore",
    "AnyAuth",
    "WriteAuth",
    "auth_state",
    "authenticate",
    "hash_token",
    "new_token",
    "principal_name",
]

logger = logging.getLogger(__name__)

Scope = Literal["read", "write", "admin"]
SESSION_COOKIE = "pacs_node_session"
CSRF_HEADER = "X-CSRF-Token"
#: Prefix of the tokens made by :func:`new_token` (lets secret scanners find them).
TOKEN_PREFIX = "pn_"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(auto_error=False, description="a token of `[[http.tokens]]` (`pacs-node token create`)")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                       description="dashboard session (`POST /api/v1/session`); writes also need X-CSRF-Token")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
SessionCookie = Annotated[str | None, Depends(_cookie)]


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as configured in ``[[http.tokens]] sha256``.

    Parameters
    ----------
    token:
        The token.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A new random token: ``pn_`` and 256 random bits, URL-safe base64.

    Returns
    -------
    str
        The token (46 characters).
    """
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a token's name and scopes, and how it was presented."""

    name: str
    scopes: frozenset[str]
    via: Literal["bearer", "session", "open"]

    def allows(self, scope: str) -> bool:
        """True when the principal has ``scope`` (``admin`` has every scope).

        Parameters
        ----------
        scope:
            ``read``, ``write`` or ``admin``.

        Returns
        -------
        bool
            Whether the scope is granted.
        """
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(TOKEN_SCOPES), "open")


class TokenStore:
    """The configured token hashes.

    Parameters
    ----------
    tokens:
        ``http.tokens``.
    """

    def __init__(self, tokens: Iterable[HttpToken]) -> None:
        self._tokens = [(bytes.fromhex(t.sha256), Principal(t.name, frozenset(t.scopes), "bearer")) for t in tokens]

    def __len__(self) -> int:
        return len(self._tokens)

    def verify(self, token: str) -> Principal | None:
        """The principal of ``token``, or ``None``.

        The token's SHA-256 is compared with every configured hash (no early
        exit), each comparison in constant time.

        Parameters
        ----------
        token:
            The presented token.

        Returns
        -------
        Principal or None
            The matching token's name and scopes.
        """
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for expected, principal in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


@dataclass
class Session:
    """A dashboard session: who logged in, its CSRF token and its expiry."""

    principal: Principal
    csrf: str
    expires: float
    created: float = field(default_factory=time.time)


class SessionStore:
    """Server-side dashboard sessions, keyed by the SHA-256 of their random id.

    Sessions live in memory: a restart of the node logs everybody out.

    Parameters
    ----------
    ttl:
        Lifetime of a session in seconds (absolute, from login).
    max_sessions:
        At most this many sessions; the one closest to expiry is dropped first.
    clock:
        Returns the current time (seconds since the epoch).
    """

    def __init__(self, ttl: float, *, max_sessions: int = 1024, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.now = clock
        self._lock = threading.Lock()
        self._sessions: dict[bytes, Session] = {}

    @staticmethod
    def _key(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()

    def create(self, principal: Principal) -> tuple[str, Session]:
        """Open a session for ``principal``.

        Parameters
        ----------
        principal:
            The token that logged in.

        Returns
        -------
        tuple of (str, Session)
            The session id (the cookie's value) and the session.
        """
        now = self.now()
        session_id = secrets.token_urlsafe(32)
        session = Session(Principal(principal.name, principal.scopes, "session"), secrets.token_urlsafe(32),
                          now + self.ttl, now)
        with self._lock:
            self._purge(now)
            while len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].expires)
                del self._sessions[oldest]
            self._sessions[self._key(session_id)] = session
        return session_id, session

    def get(self, session_id: str) -> Session | None:
        """The live session of ``session_id`` (``None`` when unknown or expired).

        Parameters
        ----------
        session_id:
            The cookie's value.

        Returns
        -------
        Session or None
            The session.
        """
        now = self.now()
        with self._lock:
            session = self._sessions.get(self._key(session_id))
            if session is not None and session.expires <= now:
                del self._sessions[self._key(session_id)]
                return None
            return session

    def revoke(self, session_id: str) -> bool:
        """End a session (logout).

        Parameters
        ----------
        session_id:
            The cookie's value.

        Returns
        -------
        bool
            Whether a session was ended.
        """
        with self._lock:
            return self._sessions.pop(self._key(session_id), None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._purge(self.now())
            return len(self._sessions)

    def _purge(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]


@dataclass
class AuthState:
    """What the checks need, kept on ``app.state.auth``."""

    http: HttpSettings
    tokens: TokenStore
    sessions: SessionStore

    @classmethod
    def from_settings(cls, http: HttpSettings) -> AuthState:
        """Build the state of the ``[http]`` settings.

        Parameters
        ----------
        http:
            ``settings.http``.

        Returns
        -------
        AuthState
            Tokens and an empty session store.
        """
        return cls(http, TokenStore(http.tokens), SessionStore(http.session_ttl_seconds))


_STATE_LOCK = threading.Lock()


def auth_state(request: Request) -> AuthState:
    """The application's :class:`AuthState` (built from the node's settings on
    first use when :func:`~pacs_node.api.app.create_app` did not).

    Parameters
    ----------
    request:
        The current request.

    Returns
    -------
    AuthState
        ``request.app.state.auth``.
    """
    state = request.app.state
    auth: AuthState | None = getattr(state, "auth", None)
    if auth is None:
        with _STATE_LOCK:
            auth = getattr(state, "auth", None)
            if auth is None:
                auth = AuthState.from_settings(state.node.settings.http)
                state.auth = auth
    return auth


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', '?')}"


def _unauthorized(request: Request, detail: str, *, invalid: bool) -> HTTPException:
    log = logger.warning if invalid else logger.info
    log("HTTP 401 on %s from %s: %s", _route(request), _client(request), detail)
    header = 'Bearer error="invalid_token"' if invalid else "Bearer"
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": header})


def _forbidden(request: Request, detail: str) -> HTTPException:
    logger.warning("HTTP 403 on %s from %s: %s", _route(request), _client(request), detail)
    return HTTPException(status.HTTP_403_FORBIDDEN, detail)


def authenticate(request: Request, bearer: HTTPAuthorizationCredentials | None, cookie: str | None) -> Principal:
    """Who sent ``request`` (any scope); see the module docstring for the order.

    Parameters
    ----------
    request:
        The current request.
    bearer:
        The parsed ``Authorization: Bearer`` header, if any.
    cookie:
        The session cookie, if any.

    Returns
    -------
    Principal
        The token (or session) that authenticated the request.

    Raises
    ------
    HTTPException
        401 without valid credentials, 403 for a session write without its
        CSRF token.
    """
    auth = auth_state(request)
    if auth.http.allow_unauthenticated:
        return ANONYMOUS
    if bearer is not None and bearer.credentials:
        principal = auth.tokens.verify(bearer.credentials)
        if principal is None:
            raise _unauthorized(request, "invalid bearer token", invalid=True)
        return principal
    if cookie:
        session = auth.sessions.get(cookie)
        if session is None:
            raise _unauthorized(request, "session expired or unknown: log in again", invalid=True)
        if request.method not in _SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), session.csrf.encode("ascii")):
                raise _forbidden(request, f"missing or wrong {CSRF_HEADER} header for a session request")
        return session.principal
    if not len(auth.tokens):
        raise _unauthorized(request, "authentication required, and no token is configured on this node "
                            "(create one with `pacs-node token create`)", invalid=False)
    raise _unauthorized(request, "missing bearer token", invalid=False)


class Require:
    """Route dependency: authenticate the request and check a scope.

    Parameters
    ----------
    scope:
        The scope the route needs; ``None``: any valid credential.
    setting:
        Instead of ``scope``: the name of an ``[http]`` setting holding
        ``"open"``, ``"read"`` or ``"admin"`` (``metrics_access``, ...).

    Examples
    --------
    ``@router.get("/x", dependencies=[Depends(Require("read"))])``
    """

    def __init__(self, scope: Scope | None = None, *, setting: str | None = None) -> None:
        self.scope = scope
        self.setting = setting

    def needed(self, http: HttpSettings) -> str | None:
        """The scope needed under ``http`` (``"open"``: no check).

        Parameters
        ----------
        http:
            The ``[http]`` settings.

        Returns
        -------
        str or None
            ``"open"``, a scope, or ``None`` (any valid credential).
        """
        if self.setting is not None:
            return str(getattr(http, self.setting))
        return self.scope

    async def __call__(self, request: Request, bearer: BearerCredentials, cookie: SessionCookie) -> Principal:
        """Check the request.

        Parameters
        ----------
        request:
            The current request.
        bearer:
            ``Authorization: Bearer`` credentials.
        cookie:
            The session cookie.

        Returns
        -------
        Principal
            Also kept as ``request.state.principal``.

        Raises
        ------
        HTTPException
            401 / 403, see :func:`authenticate`.
        """
        needed = self.needed(auth_state(request).http)
        if needed == "open":
            principal = ANONYMOUS
        else:
            principal = authenticate(request, bearer, cookie)
            if needed is not None and not principal.allows(needed):
                raise _forbidden(request, f"token {principal.name!r} lacks the {needed!r} scope")
        request.state.principal = principal
        return principal


def principal_name(request: Request) -> str:
    """Name of the token behind ``request`` (for audit log lines).

    Parameters
    ----------
    request:
        The current request, after a :class:`Require` dependency.

    Returns
    -------
    str
        The token name, or ``"unknown"``.
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.name if principal is not None else "unknown"


ReadAuth = Depends(Require("read"))
WriteAuth = Depends(Require("write"))
AdminAuth = Depends(Require("admin"))
AnyAuth = Depends(Require(None))
