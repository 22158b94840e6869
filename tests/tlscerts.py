"""Test PKI made with the ``openssl`` command line (import as
``from tlscerts import make_pki, Pki``): a CA, a server certificate for
``localhost`` / ``127.0.0.1`` and a client certificate signed by it, and a
second, unrelated CA with a client certificate of its own (to check that a
certificate from the wrong CA is refused). RSA 2048 keys, so dcmtk's default
BCP 195 profile (ECDHE-RSA / DHE-RSA suites) accepts them.

:func:`make_pki` caches one PKI per directory; the fixture in a test module::

    @pytest.fixture(scope="session")
    def pki(tmp_path_factory) -> Pki:
        return make_pki(tmp_path_factory.mktemp("pki"))
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from nodetest import require_tool

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files (keys unencrypted)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: A CA that signed nothing the node trusts.
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _run(*args: str, cwd: Path) -> None:
    res = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stderr}")


def _ca(openssl: str, d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN=pacs-node test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return cert, key


def _leaf(openssl: str, d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    _run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", str(key), "-out", str(csr),
         "-subj", f"/CN={'localhost' if server else name}", cwd=d)
    usage = "serverAuth" if server else "clientAuth"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    ext.write_text("\n".join(lines) + "\n")
    _run(openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-sha256", "-days", "3", "-extfile", str(ext), "-out", str(cert), cwd=d)
    return cert, key


_CACHE: dict[Path, Pki] = {}


def make_pki(directory: Path) -> Pki:
    """Create (once per directory) the test PKI under ``directory``."""
    directory = directory.resolve()
    if directory in _CACHE:
        return _CACHE[directory]
    openssl = require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(openssl, directory, "ca")
    other = _ca(openssl, directory, "other-ca")
    server = _leaf(openssl, directory, "server", ca, server=True)
    client = _leaf(openssl, directory, "client", ca, server=False)
    other_client = _leaf(openssl, directory, "other-client", other, server=False)
    for p in directory.glob("*.key"):
        p.chmod(0o600)
    pki = Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
              other_ca=other[0], other_client_cert=other_client[0], other_client_key=other_client[1])
    _CACHE[directory] = pki
    return pki
