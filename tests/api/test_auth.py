"""Authentication of every HTTP route: tokens with scopes, the dashboard's
session cookie with its CSRF token, the configurable /metrics and /healthz,
the unauthenticated override, and ``pacs-node token``.

The route test walks ``app.routes``: a new route that serves data without a
:class:`~pacs_node.api.auth.Require` dependency fails it unless it is added to
``PUBLIC`` (pages and probes that hold no patient data)."""

from __future__ import annotations

import io
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.routing import Mount, Route

from api_seed import AUTH, TOKEN, FakeDispatcher, Seeded, seed
from nodetest import make_settings, tokens_env
from pacs_node.api.app import create_app
from pacs_node.api.auth import Require, TokenStore, hash_token
from pacs_node.cli import main
from pacs_node.config import ConfigError, HttpToken
from pacs_node.db.models import Instance, Series, Study
from pacs_node.node import Node

READER = "pn_reader-" + "r" * 32
WRITER = "pn_writer-" + "w" * 32
ADMIN = "pn_admin-" + "a" * 32
TOKENS = tokens_env(("operator", TOKEN, ["read", "write"]), ("reader", READER, ["read"]),
                    ("writer", WRITER, ["write"]), ("admin", ADMIN, ["admin"]))
#: A token of each kind lacking the scope a route needs.
LACKING = {"read": WRITER, "write": READER, "admin": TOKEN}

#: Routes served without a token (default settings), and why.
PUBLIC = {
    ("GET", "/"): "dashboard page (no data; its script asks the API)",
    ("GET", "/jobs/{job_id}"): "dashboard page (no data)",
    ("GET", "/login"): "login form",
    ("DELETE", "/api/v1/session"): "logout (ends the caller's own session)",
    ("GET", "/livez"): "liveness probe, always open",
    ("GET", "/healthz"): "readiness probe, open by default (http.healthz_access)",
    ("GET", "/openapi.json"): "API description",
    ("GET", "/docs"): "API documentation",
    ("GET", "/docs/oauth2-redirect"): "API documentation",
    ("GET", "/redoc"): "API documentation",
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(tmp_path: Path, sqlite_url: str) -> Any:
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__tokens=TOKENS), migrate=True)
    try:
        seeded = seed(node)
        dispatcher = FakeDispatcher()
        with TestClient(create_app(node, dispatcher=dispatcher)) as c:
            yield c, seeded, dispatcher
    finally:
        node.close()


def _routes(app: Any) -> list[Any]:
    """Every route of the application, routers included (FastAPI releases
    that include routers lazily list them through ``iter_route_contexts``)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return [ctx.original_route for ctx in iter_route_contexts(app.routes)]


def _requires(dependant: Any) -> list[Require]:
    found = []
    for dep in dependant.dependencies:
        if isinstance(dep.call, Require):
            found.append(dep.call)
        found += _requires(dep)
    return found


def _path_values(seeded: Seeded) -> dict[str, str]:
    with seeded.node.db.sessionmaker() as s:
        study, series, sop = s.execute(
            select(Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid)
            .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Instance.study_id)
            .where(Study.study_instance_uid == seeded.study_uids[seeded.failed])
        ).first()  # type: ignore[misc]
    return {"job_id": str(seeded.failed), "study_uid": study, "series_uid": series, "sop_uid": sop, "n": "0",
            "frames": "1", "tag_path:path": "7FE00010"}


def _url(path: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    assert "{" not in path, path
    return path


def test_every_route_needs_a_token_with_its_scope(secured: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, seeded, _ = secured
    values = _path_values(seeded)
    checked: dict[tuple[str, str], str | None] = {}
    caplog.set_level(logging.INFO, logger="pacs_node.api.auth")
    for route in _routes(client.app):
        if isinstance(route, Mount):
            assert route.path == "/static"
            assert client.get("/static/common.js").status_code == 200  # scripts and styles only
            continue
        assert isinstance(route, (APIRoute, Route)), route
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            key = (method, route.path)
            url = _url(route.path, values)
            client.cookies.clear()  # the login route's answer sets a session cookie
            anonymous = client.request(method, url)
            if key in PUBLIC:
                assert anonymous.status_code not in (401, 403), key
                continue
            assert anonymous.status_code == 401, (key, anonymous.status_code, anonymous.text)
            assert anonymous.headers["www-authenticate"] == "Bearer", key
            wrong = client.request(method, url, headers=bearer("pn_not-a-token"))
            assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"], key
            assert isinstance(route, APIRoute)
            requires = _requires(route.dependant)
            if key == ("POST", "/api/v1/session"):  # the login checks the bearer token itself
                assert requires == []
                needed = None
            else:
                assert len(requires) == 1, key
                needed = requires[0].needed(seeded.node.settings.http)
            checked[key] = needed
            if needed is not None:
                lacking = client.request(method, url, headers=bearer(LACKING[needed]))
                assert lacking.status_code == 403 and needed in lacking.json()["detail"], (key, lacking.text)
            granted = client.request(method, url, headers=bearer(ADMIN if needed == "admin" else TOKEN))
            assert granted.status_code not in (401, 403), (key, granted.status_code, granted.text)
    # Every patient-data route was seen, with the scope docs/security.md gives it.
    assert checked == {
        ("POST", "/dicomweb/studies"): "write",
        ("POST", "/dicomweb/studies/{study_uid}"): "write",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/metadata"): "read",
        ("GET", "/dicomweb/studies/{study_uid}"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/metadata"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frames}"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulk/{tag_path:path}"): "read",
        ("GET", "/dicomweb/studies"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series"): "read",
        ("GET", "/dicomweb/series"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/series/{series_uid}/instances"): "read",
        ("GET", "/dicomweb/studies/{study_uid}/instances"): "read",
        ("GET", "/dicomweb/instances"): "read",
        ("GET", "/api/v1/jobs"): "read",
        ("GET", "/api/v1/jobs/{job_id}"): "read",
        ("POST", "/api/v1/jobs/{job_id}/retry"): "write",
        ("GET", "/api/v1/studies"): "read",
        ("POST", "/api/v1/studies/{study_uid}/analyze"): "write",
        ("POST", "/api/v1/session"): None,
        ("GET", "/api/v1/session"): None,
        ("GET", "/metrics"): "read",
        ("GET", "/jobs/{job_id}/keyimages"): "read",
        ("GET", "/jobs/{job_id}/keyimages/{n}.png"): "read",
    }
    # Refusals are logged with the route template and never with a token or a UID.
    text = caplog.text
    assert "HTTP 401 on GET /dicomweb/studies/{study_uid}/series/{series_uid} from testclient" in text
    assert "pn_not-a-token" not in text and values["study_uid"] not in text
    for token in (TOKEN, READER, WRITER, ADMIN):
        assert token not in text


def test_scopes_of_a_stow_only_and_a_read_only_token(secured: Any) -> None:
    client, seeded, dispatcher = secured
    values = _path_values(seeded)
    wado = _url("/dicomweb/studies/{study_uid}/series/{series_uid}", values)
    ctype = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'}
    empty_stow = b"--B--\r\n"
    # A sender's STOW-only token stores but cannot read.
    assert client.post("/dicomweb/studies", content=empty_stow, headers={**ctype, **bearer(WRITER)}).status_code \
        not in (401, 403)
    assert client.get(wado, headers=bearer(WRITER)).status_code == 403
    # A worker's read-only token reads but cannot store or retry.
    r = client.get(wado, headers=bearer(READER))
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    assert client.post("/dicomweb/studies", content=empty_stow, headers={**ctype, **bearer(READER)}).status_code == 403
    assert client.post(f"/api/v1/jobs/{seeded.failed}/retry", headers=bearer(READER)).status_code == 403
    assert dispatcher.process == []
    # admin implies read and write.
    assert client.get(wado, headers=bearer(ADMIN)).status_code == 200
    assert client.post(f"/api/v1/jobs/{seeded.failed}/retry", headers=bearer(ADMIN)).status_code == 202
    assert dispatcher.process == [seeded.failed]


def test_token_store_matches_only_the_configured_hashes() -> None:
    entries = [HttpToken(**t) for t in json.loads(TOKENS)]
    store = TokenStore(entries)
    assert store.verify(READER) is not None and store.verify(READER).name == "reader"  # type: ignore[union-attr]
    assert store.verify(ADMIN).scopes == frozenset({"admin"})  # type: ignore[union-attr]
    for wrong in ("", READER[:-1], READER + " ", hash_token(READER), "pn_\udcff", "é" * 50):
        assert store.verify(wrong) is None, wrong
    assert TokenStore([]).verify("") is None


def test_no_token_configured_refuses_everything(tmp_path: Path, sqlite_url: str) -> None:
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__tokens="[]"), migrate=True)
    try:
        seeded = seed(node)
        with TestClient(create_app(node, dispatcher=FakeDispatcher())) as c:
            for method, url in (("GET", "/api/v1/jobs"), ("POST", f"/api/v1/jobs/{seeded.failed}/retry"),
                                ("POST", "/dicomweb/studies"), ("GET", "/metrics"),
                                ("GET", _url("/dicomweb/studies/{study_uid}/series/{series_uid}", _path_values(seeded)))):
                for headers in ({}, bearer("anything")):
                    r = c.request(method, url, headers=headers)
                    assert r.status_code == 401, (url, r.text)
            r = c.get("/api/v1/jobs")
            assert "no token is configured" in r.json()["detail"] and "pacs-node token create" in r.json()["detail"]
            assert c.get("/livez").status_code == 200 and c.get("/").status_code == 200
    finally:
        node.close()


def test_allow_unauthenticated_turns_the_check_off(tmp_path: Path, sqlite_url: str) -> None:
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__allow_unauthenticated="true"), migrate=True)
    try:
        seeded = seed(node)
        dispatcher = FakeDispatcher()
        with TestClient(create_app(node, dispatcher=dispatcher)) as c:
            assert c.get("/api/v1/jobs").status_code == 200
            assert c.get(_url("/dicomweb/studies/{study_uid}/series/{series_uid}/metadata",
                              _path_values(seeded))).status_code == 200
            assert c.post(f"/api/v1/jobs/{seeded.failed}/retry").status_code == 202
            r = c.post("/api/v1/session")
            assert r.status_code == 200 and r.json()["via"] == "open" and "set-cookie" not in r.headers
        assert dispatcher.process == [seeded.failed]
    finally:
        node.close()
    with pytest.raises(ConfigError, match="allow_unauthenticated cannot be combined with tokens"):
        make_settings(tmp_path, sqlite_url, http__allow_unauthenticated="true", http__tokens=TOKENS)


@pytest.mark.parametrize(("access", "anonymous", "operator", "admin"), [
    ("open", 200, 200, 200),
    ("read", 401, 200, 200),
    ("admin", 401, 403, 200),
])
def test_metrics_and_healthz_access(tmp_path: Path, sqlite_url: str, access: str, anonymous: int, operator: int,
                                    admin: int) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    settings = make_settings(tmp_path, sqlite_url, http__tokens=TOKENS, http__metrics_access=access,
                             http__healthz_access=access, engine=json.dumps({"model": str(model)}))
    node = Node.from_settings(settings, migrate=True)
    try:
        with TestClient(create_app(node, dispatcher=FakeDispatcher())) as c:
            for url in ("/metrics", "/healthz"):
                got = [c.get(url, headers=h).status_code for h in ({}, bearer(TOKEN), bearer(ADMIN))]
                assert got == [anonymous, operator, admin], url
            assert c.get("/livez").status_code == 200
    finally:
        node.close()


def _set_cookie(r: Any) -> dict[str, str]:
    raw = r.headers["set-cookie"]
    name_value, *attrs = [p.strip() for p in raw.split(";")]
    out = {"": name_value}
    for a in attrs:
        k, _, v = a.partition("=")
        out[k.lower()] = v
    return out


def test_session_cookie_and_csrf(secured: Any) -> None:
    client, seeded, dispatcher = secured
    retry = f"/api/v1/jobs/{seeded.failed}/retry"
    assert client.post("/api/v1/session").status_code == 401
    r = client.post("/api/v1/session", headers=bearer("pn_wrong"))
    assert r.status_code == 401 and "set-cookie" not in r.headers and not client.cookies

    r = client.post("/api/v1/session", headers=AUTH)
    assert r.status_code == 201, r.text
    cookie = _set_cookie(r)
    assert cookie[""].startswith("pacs_node_session=") and len(cookie[""]) > 40
    assert "httponly" in cookie and cookie["samesite"].lower() == "strict" and cookie["path"] == "/"
    assert cookie["max-age"] == str(8 * 3600) and "secure" not in cookie  # plain http here
    assert r.headers["cache-control"] == "no-store"
    session = r.json()
    assert session["name"] == "operator" and session["scopes"] == ["read", "write"] and session["via"] == "session"
    csrf = session["csrf_token"]
    assert len(csrf) >= 40 and csrf not in r.headers["set-cookie"]

    # Reads with the cookie alone: the API, WADO-RS and the key images (an <img> tag sends only the cookie).
    assert client.get("/api/v1/jobs").status_code == 200
    assert client.get(_url("/dicomweb/studies/{study_uid}/series/{series_uid}/metadata",
                           _path_values(seeded))).status_code == 200
    assert client.get(f"/jobs/{seeded.failed}/keyimages").status_code == 200
    me = client.get("/api/v1/session").json()
    assert me["via"] == "session" and me["csrf_token"] == csrf
    # Writes with the cookie need the CSRF header.
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        r = client.post(retry, headers=headers)
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["detail"]
    assert dispatcher.process == []
    r = client.post(retry, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 202 and dispatcher.process == [seeded.failed]
    # A wrong bearer token is refused even next to a valid cookie.
    assert client.get("/api/v1/jobs", headers=bearer("pn_wrong")).status_code == 401

    # Expiry: the session ends after http.session_ttl_seconds.
    sessions = client.app.state.auth.sessions
    sessions.now = lambda: time.time() + sessions.ttl + 1
    r = client.get("/api/v1/jobs")
    assert r.status_code == 401 and "log in again" in r.json()["detail"]
    sessions.now = time.time

    # A new login starts a new session id and ends the one it was sent with.
    client.cookies.clear()
    assert client.post("/api/v1/session", headers=AUTH).status_code == 201
    first = client.cookies["pacs_node_session"]
    assert client.post("/api/v1/session", headers=AUTH).status_code == 201
    old = client.cookies["pacs_node_session"]
    assert old != first and len(sessions) == 1
    # Logout ends the session on the server: the old cookie value is refused.
    r = client.delete("/api/v1/session")
    assert r.status_code == 204 and _set_cookie(r)["max-age"] == "0"
    client.cookies.clear()
    assert client.get("/api/v1/jobs", cookies={"pacs_node_session": old}).status_code == 401
    assert len(sessions) == 0


def test_session_carries_the_token_scopes_and_is_secure_over_https(secured: Any) -> None:
    client, seeded, dispatcher = secured
    with TestClient(client.app, base_url="https://testserver") as https:
        r = https.post("/api/v1/session", headers=bearer(READER))
        assert r.status_code == 201 and "secure" in _set_cookie(r)
        csrf = r.json()["csrf_token"]
        assert https.get("/api/v1/jobs").status_code == 200
        r = https.post(f"/api/v1/jobs/{seeded.failed}/retry", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 403 and "lacks the 'write' scope" in r.json()["detail"]
    assert dispatcher.process == []


def test_token_create_prints_a_working_token(tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["token", "create", "--name", "worker-gpu1", "--scopes", "read"]) == 0
    out = capsys.readouterr().out
    (token,) = [line for line in out.splitlines() if line.startswith("pn_")]
    assert len(token) >= 46
    table = tomllib.loads(out.split("\n", 3)[3])["http"]["tokens"][0]
    assert table == {"name": "worker-gpu1", "sha256": hash_token(token), "scopes": ["read"]}
    assert token not in out.split(token, 1)[1]  # printed once
    # The table configures a node that accepts the token for reads only.
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__tokens=json.dumps([table])), migrate=True)
    try:
        seeded = seed(node)
        with TestClient(create_app(node, dispatcher=FakeDispatcher())) as c:
            assert c.get("/api/v1/jobs", headers=bearer(token)).status_code == 200
            assert c.post(f"/api/v1/jobs/{seeded.failed}/retry", headers=bearer(token)).status_code == 403
    finally:
        node.close()
    # Two tokens are never the same; `token hash` gives the table of a known token.
    assert main(["token", "create", "--name", "x", "--scopes", "read"]) == 0
    assert token not in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert main(["token", "hash", "--name", "worker-gpu1", "--scopes", "read"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["http"]["tokens"][0] == table
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["token", "hash", "--name", "x", "--scopes", "read"]) == 2
    assert main(["token", "create", "--name", "bad name", "--scopes", "read"]) == 2
    assert "invalid token name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["token", "create", "--name", "x", "--scopes", "read,root"])
    # --append-to: the table goes into a configuration file, only the token is printed.
    cfg = tmp_path / "node.toml"
    cfg.write_text('[http]\nport = 8081\n\n[storage]\nmin_free_bytes = 0\n')
    assert main(["token", "create", "--name", "alice", "--scopes", "read,write", "--append-to", str(cfg)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("pn_") and "\n" not in printed
    (entry,) = tomllib.loads(cfg.read_text())["http"]["tokens"]
    assert entry["name"] == "alice" and entry["sha256"] == hash_token(printed)
    assert main(["token", "create", "--name", "alice", "--scopes", "read", "--append-to", str(cfg)]) == 2
    assert "already has a token named 'alice'" in capsys.readouterr().err
    assert len(tomllib.loads(cfg.read_text())["http"]["tokens"]) == 1
