"""DICOM TLS on the node's SCP, checked with dcmtk's own TLS tools
(``echoscu`` / ``storescu +tls``); certificates are made in the test
(tests/tlscerts.py)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_factory import make_study, write_files
from nodetest import make_settings, require_tool
from pacs_node.config import ConfigError
from pacs_node.db.models import Instance
from pacs_node.dicom_tls import TLSConfigError
from pacs_node.ingest.dimse import DimseServer
from pacs_node.node import Node
from tlscerts import Pki, make_pki

ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_node(tmp_path: Path, sqlite_url: str, pki: Pki, *, mutual: bool = True,
             **dicom: object) -> Iterator[tuple[Node, DimseServer]]:
    keys: dict[str, object] = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, **dicom}
    if mutual:
        keys["tls_ca"] = pki.ca
    settings = make_settings(tmp_path, sqlite_url, storage__fsync="false",
                             **{f"dicom__{k}": v for k, v in keys.items()})
    node = Node.from_settings(settings, migrate=True)
    server = DimseServer(settings.dicom, node.ingestor)
    server.start()
    try:
        yield node, server
    finally:
        server.stop()
        node.close()


def dcmtk(tool: str, port: int, *args: str | Path, files: list[Path] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool(tool), *map(str, args), "-aec", "PACSNODE", "127.0.0.1", str(port),
                           *map(str, files or [])], capture_output=True, text=True, env=ENV, timeout=60)


def client_cert(pki: Pki) -> list[str | Path]:
    return ["+tls", pki.client_key, pki.client_cert, "+cf", pki.ca]


def count(node: Node) -> int:
    with node.db.sessionmaker() as s:
        return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


def test_mutual_tls_accepts_dcmtk_with_a_client_certificate(
    tmp_path: Path, sqlite_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    study = make_study(n_series=2, per_series=2)
    files = write_files(study, tmp_path / "in")
    with caplog.at_level(logging.INFO, "pacs_node"), tls_node(tmp_path, sqlite_url, pki) as (node, server):
        echo = dcmtk("echoscu", server.port, *client_cert(pki))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        store = dcmtk("storescu", server.port, *client_cert(pki), files=files)
        assert store.returncode == 0, store.stdout + store.stderr
        assert count(node) == 4
        assert "listening on 127.0.0.1:%d (TLS with client certificates)" % server.port in caplog.text
        assert "association accepted from STORESCU@127.0.0.1" in caplog.text and "over TLS (CN=client)" in caplog.text


def test_mutual_tls_refuses_no_certificate_a_foreign_ca_and_plain_tcp(
    tmp_path: Path, sqlite_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with tls_node(tmp_path, sqlite_url, pki) as (node, server), caplog.at_level(logging.WARNING, "pacs_node"):
        anonymous = dcmtk("echoscu", server.port, "+tla", "+cf", pki.ca)  # TLS, no client certificate
        assert anonymous.returncode != 0
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text
        foreign = dcmtk("echoscu", server.port, "+tls", pki.other_client_key, pki.other_client_cert, "+cf", pki.ca)
        assert foreign.returncode != 0
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        plain = dcmtk("echoscu", server.port)
        assert plain.returncode != 0
        assert caplog.text.count("TLS handshake with 127.0.0.1:") == 3
        # The node trusts only its CA: a client that does not trust the node's certificate stops too.
        distrust = dcmtk("echoscu", server.port, "+tls", pki.client_key, pki.client_cert, "+cf", pki.other_ca)
        assert distrust.returncode != 0
        ok = dcmtk("echoscu", server.port, *client_cert(pki))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert count(node) == 0


def test_tls_without_client_certificates_and_a_plain_port_beside_it(
    tmp_path: Path, sqlite_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """``tls_ca`` unset: any client that trusts the node's certificate; with
    ``tls_port`` set, plain DICOM stays on ``port`` and TLS listens on ``tls_port``."""
    files = write_files(make_study(n_series=1, per_series=2), tmp_path / "in")
    with caplog.at_level(logging.INFO, "pacs_node"), \
            tls_node(tmp_path, sqlite_url, pki, mutual=False, tls_port=0) as (node, server):
        assert server.port != server.tls_port
        anonymous = dcmtk("storescu", server.tls_port, "+tla", "+cf", pki.ca, files=files)
        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        plain = dcmtk("echoscu", server.port)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        tls_on_plain = dcmtk("echoscu", server.port, "+tla", "+cf", pki.ca)
        assert tls_on_plain.returncode != 0  # the plain port does not speak TLS
        assert count(node) == 2
        assert f"listening on 127.0.0.1:{server.tls_port} (TLS)" in caplog.text
        assert f"listening on 127.0.0.1:{server.port} (plain)" in caplog.text


def test_silent_tls_clients_do_not_stop_the_accept_loop(
    tmp_path: Path, sqlite_url: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom runs the handshake in its accept loop: one client that
    connects and never sends a ClientHello stops every other. The node runs
    it in the connection's thread, within the pre-association timeout."""
    with tls_node(tmp_path, sqlite_url, pki, pre_association_timeout="1") as (_node, server), \
            caplog.at_level(logging.WARNING, "pacs_node"):
        silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=("127.0.0.2", 0))
                  for _ in range(3)]
        time.sleep(0.2)
        t0 = time.monotonic()
        ok = dcmtk("echoscu", server.port, *client_cert(pki))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert time.monotonic() - t0 < 0.9  # served before the silent ones time out
        for s in silent:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the node
            s.close()
        assert "TLS handshake with 127.0.0.2:" in caplog.text and "not complete within 1.0 s" in caplog.text


def test_tls_settings_are_checked(tmp_path: Path, sqlite_url: str, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="dicom.tls_cert"):
        make_settings(tmp_path, sqlite_url, dicom__tls_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="tls_key, tls_ca and tls_port need tls_cert"):
        make_settings(tmp_path, sqlite_url, dicom__tls_ca=str(pki.ca))
    # A key that does not belong to the certificate: refused at start, naming the files.
    settings = make_settings(tmp_path, sqlite_url, dicom__tls_cert=str(pki.server_cert),
                             dicom__tls_key=str(pki.client_key))
    node = Node.from_settings(settings, migrate=True)
    try:
        with pytest.raises(TLSConfigError, match="server.pem with key .*client.key"):
            DimseServer(settings.dicom, node.ingestor).start()
    finally:
        node.close()


def test_pull_over_tls_from_orthanc(tmp_path: Path, pki: Pki) -> None:
    """C-FIND and C-GET over DICOM TLS against Orthanc (``DicomTlsEnabled``,
    client certificates required), the node presenting its client certificate."""
    from pydicom import dcmread

    from nodetest import free_port
    from pacs_node.pull.base import SourceError, SourceUnavailableError
    from pacs_node.pull.dimse import get_study, list_instances, query_study
    from pacs_node.pull.settings import load_sources
    from peers import start_orthanc

    study = make_study(n_series=2, per_series=2)
    files = write_files(study, tmp_path / "in")
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server_cert),
           "DicomTlsPrivateKey": str(pki.server_key), "DicomTlsTrustedCertificates": str(pki.ca),
           "DicomTlsRemoteCertificateRequired": True}
    with start_orthanc(tmp_path / "orthanc", node_aet="PACSNODE", node_port=free_port(), extra_config=tls) as orthanc:
        orthanc.upload(files)
        keys: dict[str, Any] = {"tls": True, "tls_ca": str(pki.ca)}
        (src,) = load_sources([orthanc.source("c-get", **keys, tls_cert=str(pki.client_cert),
                                              tls_key=str(pki.client_key))])
        uid = str(study[0].StudyInstanceUID)
        assert query_study(src, uid).count == 4
        assert set(list_instances(src, uid).instances or {}) == {str(ds.SOPInstanceUID) for ds in study}
        got: list[bytes] = []

        def sink(data: bytes) -> int:
            got.append(data)
            return 0

        outcome = get_study(src, uid, sink)
        assert (outcome.status, outcome.completed, outcome.failed) == (0, 4, 0)
        from io import BytesIO

        assert {str(dcmread(BytesIO(b)).SOPInstanceUID) for b in got} == {str(ds.SOPInstanceUID) for ds in study}
        # Without the client certificate Orthanc ends the handshake: a permanent, explained error.
        (anonymous,) = load_sources([orthanc.source("c-get", **keys)])
        with pytest.raises(SourceError, match="TLS handshake with ORTHANC@127.0.0.1:.* failed"):
            query_study(anonymous, uid)
        # Plain DICOM to a TLS-only port: no association (Orthanc closes it).
        (plain,) = load_sources([orthanc.source("c-get", timeout=5)])
        with pytest.raises(SourceUnavailableError, match="source orthanc-c-get unreachable"):
            query_study(plain, uid)


def test_source_tls_keys_are_validated(tmp_path: Path, pki: Pki) -> None:
    from pacs_node.pull.settings import load_sources

    base = {"name": "s", "kind": "dimse", "host": "h", "ae_title": "A"}
    (src,) = load_sources([{**base, "tls": True, "tls_ca": str(pki.ca)}])
    assert src.describe() == "s (DIMSE TLS A@h:104, c-get)"
    with pytest.raises(ValueError, match=r"sources\[s\]\.tls_cert: Path does not point to a file"):
        load_sources([{**base, "tls": True, "tls_cert": str(tmp_path / "nope.pem")}])
    with pytest.raises(ValueError, match="tls_key needs tls_cert"):
        load_sources([{**base, "tls": True, "tls_key": str(pki.client_key)}])
    with pytest.raises(ValueError, match="tls keys apply to dimse sources"):
        load_sources([{"name": "w", "kind": "dicomweb", "url": "https://x", "tls": True}])


@pytest.mark.parametrize(
    ("keys", "warns"),
    [
        ({"host": "0.0.0.0"}, True),
        ({"host": "0.0.0.0", "allowed_calling_aets": '["PACS"]'}, False),
        ({"host": "0.0.0.0", "tls": "mutual"}, False),
        ({"host": "0.0.0.0", "tls": "mutual", "tls_port": "0"}, True),  # plain port beside it
        ({"host": "0.0.0.0", "tls": "server-only"}, True),
        ({"host": "127.0.0.1"}, False),
    ],
)
def test_start_warns_when_any_host_can_store(tmp_path: Path, sqlite_url: str, pki: Pki,
                                             caplog: pytest.LogCaptureFixture, keys: dict[str, str],
                                             warns: bool) -> None:
    """The check runs at start; here without binding (tests listen on loopback only)."""
    dicom = {k: v for k, v in keys.items() if k != "tls"}
    if "tls" in keys:
        dicom.update(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
        if keys["tls"] == "mutual":
            dicom["tls_ca"] = str(pki.ca)
    settings = make_settings(tmp_path, sqlite_url, **{f"dicom__{k}": v for k, v in dicom.items()})
    node = Node.from_settings(settings, migrate=True)
    try:
        with caplog.at_level(logging.WARNING, "pacs_node"):
            DimseServer(settings.dicom, node.ingestor)._warn_if_open()
    finally:
        node.close()
    assert ("any host that reaches it can store instances" in caplog.text) is warns
