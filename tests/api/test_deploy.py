"""Deployment files: the compose file parses with docker-compose, the
Kubernetes manifests and the configurations are consistent, the systemd units
pass ``systemd-analyze verify``. (No container engine is needed.)"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from nodetest import require_tool
from pacs_node.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _yaml(tool: str, *paths: Path) -> list[Any]:
    """YAML documents, parsed by the system Python's PyYAML (a dependency of
    Debian's docker-compose; the project itself needs no YAML library)."""
    code = "import json, sys, yaml; json.dump([d for p in sys.argv[1:] for d in yaml.safe_load_all(open(p))], sys.stdout)"
    python = Path(tool).resolve().parent / "python3"
    out = subprocess.run([str(python), "-c", code, *map(str, paths)], capture_output=True, text=True, check=True)
    return [d for d in json.loads(out.stdout) if d is not None]


def test_compose_file_is_valid(tmp_path: Path) -> None:
    tool = require_tool("docker-compose")
    env = {**os.environ, "POSTGRES_PASSWORD": "p"}
    check = subprocess.run([tool, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr
    resolved = subprocess.run([tool, "-f", str(DEPLOY / "docker-compose.yml"), "config"],
                              capture_output=True, text=True, env=env, check=True)
    rendered = tmp_path / "compose-rendered.yml"
    rendered.write_text(resolved.stdout)
    (compose,) = _yaml(tool, rendered)
    services = compose["services"]
    assert {"node", "worker-gpu0", "worker-io", "redis", "postgres", "orthanc", "migrate"} <= set(services)
    (device,) = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["worker-gpu0"]["build"]["dockerfile"].endswith("Dockerfile.worker")
    # No token in the environment: the node keeps only hashes, in its configuration file.
    assert not any("TOKEN" in k for k in services["node"]["environment"])
    assert services["node"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["orthanc"]["image"].startswith("jodogne/orthanc-plugins")
    mounts = " ".join(str(v) for v in services["orthanc"]["volumes"])
    assert "orthanc.json" in mounts and "autoroute.lua" in mounts
    for name in ("Dockerfile", "Dockerfile.worker"):
        text = (DEPLOY / name).read_text()
        assert "pacs-node" in text and "ENTRYPOINT" in text
    assert "pytorch/pytorch" in (DEPLOY / "Dockerfile.worker").read_text()


def test_orthanc_routes_to_the_node() -> None:
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    node = orthanc["DicomModalities"]["pacsnode"]
    config = tomllib.loads((DEPLOY / "config" / "pacs-node.toml").read_text())
    assert (node["AET"], node["Host"], node["Port"]) == (config["dicom"]["ae_title"], "node", config["dicom"]["port"])
    assert orthanc["DicomAet"] in config["dicom"]["allowed_calling_aets"]
    assert orthanc["LuaScripts"] == ["/etc/orthanc/autoroute.lua"]
    lua = (DEPLOY / "orthanc" / "autoroute.lua").read_text()
    assert "function OnStableStudy" in lua and "'/modalities/' .. NODE_MODALITY .. '/store'" in lua
    (dest,) = config["destinations"]
    assert (dest["host"], dest["port"], dest["ae_title"]) == ("orthanc", orthanc["DicomPort"], orthanc["DicomAet"])


def test_kubernetes_manifests(tmp_path: Path) -> None:
    tool = require_tool("docker-compose")
    manifests = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    docs = _yaml(tool, *manifests)
    assert all(d["metadata"].get("namespace", "pacs-node") == "pacs-node" for d in docs)
    by_kind: dict[tuple[str, str], Any] = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ("Namespace", "pacs-node") in by_kind

    node = by_kind[("Deployment", "pacs-node")]["spec"]["template"]["spec"]
    assert node["initContainers"][0]["args"][:2] == ["db", "upgrade"]
    assert node["containers"][0]["args"][0] == "serve"
    assert node["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["port"] for p in by_kind[("Service", "pacs-node")]["spec"]["ports"]}
    assert ports == {"dicom": 11112, "http": 8080}

    gpu = by_kind[("Deployment", "pacs-node-worker-gpu")]["spec"]
    assert gpu["replicas"] >= 1
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][-2:] == ["--queues", "gpu"]
    assert by_kind[("PersistentVolumeClaim", "pacs-node-data")]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {("StatefulSet", "redis"), ("StatefulSet", "postgres")} <= set(by_kind)

    # The TOML in the ConfigMap is a valid node configuration.
    toml_text = by_kind[("ConfigMap", "pacs-node-config")]["data"]["config.toml"]
    (tmp_path / "config.toml").write_text(toml_text)
    settings = load_settings(tmp_path / "config.toml")
    assert settings.queue.broker_url.startswith("redis://") and settings.database.url.startswith("postgresql")
    assert settings.http.port == 8080 and settings.dicom.port == 11112

    kustomization = _yaml(tool, DEPLOY / "k8s" / "kustomization.yaml")[0]
    assert "secret.example.yaml" not in kustomization["resources"]
    for res in kustomization["resources"]:
        assert (DEPLOY / "k8s" / res).is_file()


def test_compose_configuration_is_valid() -> None:
    settings = load_settings(DEPLOY / "config" / "pacs-node.toml")
    assert settings.queue.start_worker is False and settings.database.auto_upgrade is False
    assert settings.engine["model"] == "/models/demo.pt"


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    units = DEPLOY / "systemd"
    pacs_node = Path(sys.executable).parent / "pacs-node"
    node_unit = configparser.ConfigParser(interpolation=None, strict=False)
    node_unit.read(units / "pacs-node.service")
    assert node_unit["Service"]["ExecStart"].endswith("pacs-node serve --config /etc/pacs-node/config.toml")
    worker = (units / "pacs-node-worker@.service").read_text()
    assert "Environment=CUDA_VISIBLE_DEVICES=%i" in worker and "worker --config /etc/pacs-node/config.toml --queues gpu" in worker
    # Verify copies whose ExecStart points at this environment's pacs-node.
    targets = {
        "pacs-node.service": "pacs-node.service",
        "pacs-node-worker@.service": "pacs-node-worker@0.service",
        "pacs-node-delivery.service": "pacs-node-delivery.service",
    }
    paths = []
    for src, dst in targets.items():
        text = (units / src).read_text().replace("/opt/pacs-node/venv/bin/pacs-node", str(pacs_node))
        (tmp_path / dst).write_text(text)
        paths.append(str(tmp_path / dst))
    r = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
