"""HTTPS on the node's HTTP server (real certificates made with openssl, a real
httpx client verifying them), client certificates, a remote worker fetching
over HTTPS with its own read-only token, the start-up refusal of an exposed
HTTP server without tokens, the DICOM exposure warning, the SQLite file's
mode, and invalid UIDs kept out of logs and error details."""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.api_seed import FakeDispatcher, gradient_series, ingest
from dicom_factory import make_instance, to_bytes
from nodetest import TEST_AUTH, TEST_TOKEN, free_port, make_settings, tokens_env
from pacs_node.api.app import create_app
from pacs_node.config import ConfigError
from pacs_node.db.session import Database
from pacs_node.ingest.dimse import DimseServer
from pacs_node.ingest.recorder import IngestError, parse_meta
from pacs_node.ingest.uids import InvalidUIDError, check_uid
from pacs_node.node import Node
from pacs_node.serve import NodeServer, check_http_exposure, http_tls_options
from tlscerts import Pki, make_pki
from worker.fetch import FetchError, fetch_series_remote
from worker.settings import WorkerSettings

WORKER_TOKEN = "pn_worker-" + "9" * 32
#: A UID field holding patient data, as a broken or hostile sender may send it.
PHI_UID = "DOE^JOHN^19700101"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _ctx(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


@pytest.fixture
def https_server(tmp_path: Path, sqlite_url: str, pki: Pki) -> Iterator[tuple[NodeServer, Any]]:
    """``NodeServer`` (the code ``pacs-node serve`` runs) with ``[http] tls_cert``/``tls_key``."""
    settings = make_settings(tmp_path, sqlite_url, http__tls_cert=pki.server_cert, http__tls_key=pki.server_key,
                             http__tokens=tokens_env(("test", TEST_TOKEN, ["read", "write"]),
                                                     ("worker", WORKER_TOKEN, ["read"])))
    node = Node.from_settings(settings, migrate=True)
    series = gradient_series(3, 16, 16)
    ingest(node, series)
    server = NodeServer(node, dispatcher=FakeDispatcher())
    server.start_background()
    try:
        yield server, series
    finally:
        server.stop()
        node.close()


def test_https_round_trip_with_a_verified_certificate(https_server: tuple[NodeServer, Any], pki: Pki) -> None:
    server, series = https_server
    base = f"https://127.0.0.1:{server.http_port}"
    wado = f"/dicomweb/studies/{series[0].StudyInstanceUID}/series/{series[0].SeriesInstanceUID}/metadata"
    with httpx.Client(base_url=base, verify=_ctx(pki.ca), timeout=10) as c:
        assert c.get("/livez").json() == {"ok": True}
        assert c.get(wado).status_code == 401
        r = c.get(wado, headers=TEST_AUTH)
        assert r.status_code == 200 and len(r.json()) == 3
        # The dashboard's session cookie is Secure over HTTPS.
        r = c.post("/api/v1/session", headers=TEST_AUTH)
        assert r.status_code == 201 and "secure" in r.headers["set-cookie"].lower()
    # Not trusted without the CA (the system store), nor by an unrelated CA.
    for verify in (True, _ctx(pki.other_ca)):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(base + "/livez", verify=verify, timeout=10)
    # Plain HTTP on the TLS port gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.http_port}/livez", timeout=5)


def test_remote_worker_fetches_over_https_with_its_own_token(https_server: tuple[NodeServer, Any], pki: Pki,
                                                             tmp_path: Path) -> None:
    server, series = https_server
    url = f"https://127.0.0.1:{server.http_port}"
    study, uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    ws = WorkerSettings(storage="remote", node_url=url, node_token=WORKER_TOKEN, node_ca_file=pki.ca)
    with fetch_series_remote(url, study, uid, token=ws.node_token, verify=ws.node_verify()) as files:
        assert sorted(p.read_bytes() for p in files.paths) == sorted(to_bytes(ds) for ds in series)
    with pytest.raises(FetchError, match="certificate failed verification") as err:
        fetch_series_remote(url, study, uid, token=WORKER_TOKEN, verify=WorkerSettings().node_verify())
    assert not err.value.transient
    for token in ("", "pn_wrong"):
        with pytest.raises(FetchError, match="read scope") as err:
            fetch_series_remote(url, study, uid, token=token, verify=ws.node_verify())
        assert not err.value.transient
    assert WorkerSettings(node_verify_tls=False).node_verify() is False


def test_client_certificates_with_tls_ca(tmp_path: Path, sqlite_url: str, pki: Pki) -> None:
    settings = make_settings(tmp_path, sqlite_url, http__tls_cert=pki.server_cert, http__tls_key=pki.server_key,
                             http__tls_ca=pki.ca)
    node = Node.from_settings(settings, migrate=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(node, dispatcher=FakeDispatcher()), host="127.0.0.1", port=port,
                                           log_config=None, **http_tls_options(settings.http)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        url = f"https://127.0.0.1:{port}/api/v1/jobs"
        r = httpx.get(url, verify=_ctx(pki.ca, (pki.client_cert, pki.client_key)), headers=TEST_AUTH, timeout=10)
        assert r.status_code == 200
        # The certificate does not replace the token.
        assert httpx.get(url, verify=_ctx(pki.ca, (pki.client_cert, pki.client_key)), timeout=10).status_code == 401
        for ctx in (_ctx(pki.ca), _ctx(pki.ca, (pki.other_client_cert, pki.other_client_key))):
            with pytest.raises(httpx.TransportError):
                httpx.get(url, verify=ctx, headers=TEST_AUTH, timeout=10)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        node.close()


@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_tls_proxy_the_cookie_is_secure(tmp_path: Path, sqlite_url: str, trusted: bool) -> None:
    """The reverse-proxy set-up of docs/security.md: plain HTTP on loopback, the
    proxy's X-Forwarded-Proto believed only from http.forwarded_allow_ips."""
    allowed = '["127.0.0.1"]' if trusted else '["192.0.2.1"]'
    node = Node.from_settings(make_settings(tmp_path, sqlite_url, http__forwarded_allow_ips=allowed), migrate=True)
    server = NodeServer(node, dispatcher=FakeDispatcher())
    server.start_background()
    try:
        r = httpx.post(f"http://127.0.0.1:{server.http_port}/api/v1/session", timeout=10,
                       headers={**TEST_AUTH, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"})
        assert r.status_code == 201
        assert ("secure" in r.headers["set-cookie"].lower()) is trusted
    finally:
        server.stop()
        node.close()


def test_tls_configuration_errors(tmp_path: Path, sqlite_url: str, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        make_settings(tmp_path, sqlite_url, http__tls_cert=pki.server_cert)
    with pytest.raises(ConfigError, match="tls_ca .* needs tls_cert"):
        make_settings(tmp_path, sqlite_url, http__tls_ca=pki.ca)
    with pytest.raises(ConfigError, match="http.tls_key"):
        make_settings(tmp_path, sqlite_url, http__tls_cert=pki.server_cert, http__tls_key=tmp_path / "missing.key")
    wrong_key = make_settings(tmp_path, sqlite_url, http__tls_cert=pki.server_cert, http__tls_key=pki.client_key)
    with pytest.raises(ConfigError, match="cannot load") as err:
        http_tls_options(wrong_key.http)
    assert "\n" not in str(err.value)


def _serve(tmp_path: Path, http: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[dicom]
port = {free_port()}
[http]
port = {free_port()}
{http}
[storage]
root = "{tmp_path / 'storage'}"
[database]
url = "sqlite:///{tmp_path / 'node.db'}"
[queue]
start_worker = false
""")
    return subprocess.run([sys.executable, "-m", "pacs_node", "--config", str(cfg), "serve"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_serve_refuses_a_network_http_host_without_tokens(tmp_path: Path) -> None:
    """Refused before anything is bound or created (nothing listens on 0.0.0.0)."""
    r = _serve(tmp_path, 'host = "0.0.0.0"')
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pacs-node: refusing to start: http.host 0.0.0.0 is not a loopback")
    assert "pacs-node token create" in lines[0] and "http.allow_unauthenticated = true" in lines[0]
    assert not (tmp_path / "node.db").exists() and not (tmp_path / "storage").exists()


def test_http_exposure_rules(tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        caplog.clear()
        check_http_exposure(make_settings(tmp_path, sqlite_url, http__host=host, http__tokens="[]"))
        assert "every patient-data HTTP endpoint answers 401" in caplog.text
        caplog.clear()
        check_http_exposure(make_settings(tmp_path, sqlite_url, http__host=host))
        assert caplog.text == ""
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "pacs-node.example.org"):
        with pytest.raises(ConfigError, match="refusing to start"):
            check_http_exposure(make_settings(tmp_path, sqlite_url, http__host=host, http__tokens="[]"))
        caplog.clear()
        check_http_exposure(make_settings(tmp_path, sqlite_url, http__host=host))  # tokens: allowed, but no TLS
        assert "has no TLS" in caplog.text
        caplog.clear()
        check_http_exposure(make_settings(tmp_path, sqlite_url, http__host=host, http__allow_unauthenticated="true"))
        assert "http.allow_unauthenticated is set" in caplog.text


def test_dicom_host_without_allow_list_or_client_certificates_warns(tmp_path: Path, sqlite_url: str, pki: Pki,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    node = Node.from_settings(make_settings(tmp_path, sqlite_url), migrate=True)
    try:
        cases = [
            ({"dicom__host": "0.0.0.0"}, True),
            ({"dicom__host": "0.0.0.0", "dicom__allowed_calling_aets": '["ORTHANC"]'}, False),
            ({"dicom__host": "0.0.0.0", "dicom__tls_cert": pki.server_cert, "dicom__tls_key": pki.server_key,
              "dicom__tls_ca": pki.ca}, False),
            ({"dicom__host": "0.0.0.0", "dicom__tls_cert": pki.server_cert, "dicom__tls_key": pki.server_key}, True),
            ({"dicom__host": "127.0.0.1"}, False),
        ]
        for overrides, warned in cases:
            caplog.clear()
            settings = make_settings(tmp_path, sqlite_url, **overrides)
            # The start-up check alone (start() would listen on every interface).
            DimseServer(settings.dicom, node.ingestor)._warn_if_open()
            found = [r for r in caplog.records if r.levelno == logging.WARNING and "allowed_calling_aets" in r.message]
            assert bool(found) == warned, overrides
    finally:
        node.close()


def test_sqlite_database_files_are_private(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "data" / "pacs-node.db"
        db = Database(f"sqlite:///{path}")
        with db.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x)")
            conn.exec_driver_sql("INSERT INTO t VALUES ('Doe^John')")
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == ["pacs-node.db", "pacs-node.db-shm", "pacs-node.db-wal"]
        assert {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()} == dict.fromkeys(files, 0o600)
        db.dispose()
        # A database created 0644 by an older version is tightened, with a warning.
        legacy = tmp_path / "legacy.db"
        legacy.touch(mode=0o644)
        legacy.chmod(0o644)
        Database(f"sqlite:///{legacy}").dispose()
        assert legacy.stat().st_mode & 0o777 == 0o600 and "was readable by others (mode 644)" in caplog.text
    finally:
        os.umask(old)


def test_node_database_file_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        node = Node.from_settings(make_settings(tmp_path, f"sqlite:///{tmp_path / 'node.db'}"), migrate=True)
        ingest(node, gradient_series(1, 8, 8))
        node.close()
    finally:
        os.umask(old)
    for p in tmp_path.glob("node.db*"):
        assert p.stat().st_mode & 0o777 == 0o600, p


def _phi_uid_instance() -> bytes:
    ds = make_instance(study_uid="1.2.3", series_uid="1.2.3.4")
    with warnings.catch_warnings():  # pydicom's own check of the value it writes
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = PHI_UID
        return to_bytes(ds)


def test_invalid_uid_is_not_echoed(tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(InvalidUIDError) as err:
        check_uid(PHI_UID, "StudyInstanceUID")
    assert PHI_UID not in str(err.value) and "DOE" not in str(err.value)
    assert "17 characters" in str(err.value) and "sha256" in str(err.value)
    assert "longer than 64" in str(pytest.raises(InvalidUIDError, check_uid, "1" * 65, "SOPInstanceUID").value)

    data = _phi_uid_instance()
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with pytest.raises(IngestError) as ingest_err:
        parse_meta(data)  # the C-STORE / STOW-RS path: the Error Comment
    assert ingest_err.value.status == 0xC211 and "DOE" not in ingest_err.value.comment

    node = Node.from_settings(make_settings(tmp_path, sqlite_url), migrate=True)
    try:
        with TestClient(create_app(node, dispatcher=FakeDispatcher()), headers=TEST_AUTH) as c:
            r = c.get(f"/dicomweb/studies/{PHI_UID}/series/1.2.3/metadata")
            assert r.status_code == 400 and "StudyInstanceUID is not a valid UID" in r.json()["detail"]
            r2 = c.post(f"/api/v1/studies/{PHI_UID}/analyze")
            assert r2.status_code == 400
            for resp in (r, r2):
                assert "DOE" not in resp.text
            body = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--B--\r\n"
            r3 = c.post("/dicomweb/studies", content=body,
                        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
            assert r3.status_code == 409 and "DOE" not in r3.text
    finally:
        node.close()
    node_lines = [r.getMessage() for r in caplog.records if r.name.startswith("pacs_node")]
    assert node_lines and not any("DOE" in line for line in node_lines)


def test_pydicom_invalid_value_lines_are_withheld(tmp_path: Path) -> None:
    """pydicom logs (and warns) an invalid value verbatim; the node's logging keeps the VR only."""
    (tmp_path / "bad.dcm").write_bytes(_phi_uid_instance())
    code = (
        "import sys\n"
        "from pacs_node.logging_setup import configure_logging\n"
        "from pacs_node.ingest.recorder import IngestError, parse_meta\n"
        "configure_logging('INFO')\n"
        "try:\n"
        f"    parse_meta(open({str(tmp_path / 'bad.dcm')!r}, 'rb').read())\n"
        "except IngestError as exc:\n"
        "    print(hex(exc.status))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "0xc211", r.stderr
    assert "Invalid value for VR UI (value withheld)" in r.stderr
    assert "DOE" not in r.stderr
