"""The serving deployment files validate offline against the Kubernetes and compose schemas (strict: an unknown
field fails), and hold what serving relies on: one GPU per replica, readiness on /readyz, an autoscaler, API keys
and the read-only MLflow role from secrets. (tests/flows/test_serve_auth.py runs them, rendered for loopback.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = ROOT / "infra" / "k8s" / "serve.yaml"
COMPOSE = ROOT / "infra" / "docker-compose.yml"


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)


def compose_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def test_kubernetes_manifests_validate_and_serve_on_one_gpu_with_readiness_and_autoscaling() -> None:
    res = kubernetes_validate(K8S)
    assert res.returncode == 0, res.stdout + res.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "v2m_queue_depth"  # a metric /metrics exports
    env = {e["name"]: e for e in container["env"]}
    for name in ("V2M_SERVE_API_KEYS", "MLFLOW_TRACKING_PASSWORD"):  # secrets come from a Secret, not the file
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "v2m-serve" and "value" not in env[name]
    assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "serve"


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "serve.yaml"
    broken.write_text(K8S.read_text().replace("readinessProbe:", "readinesProbe:", 1))
    assert kubernetes_validate(broken).returncode != 0


def test_compose_serve_service_validates_on_loopback_with_one_gpu(tmp_path: Path) -> None:
    res = compose_validate(COMPOSE)
    assert res.returncode == 0, res.stdout + res.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    serve = services["serve"]
    assert serve["ports"] == ["127.0.0.1:8000:8000"]
    env = serve["environment"]
    assert env["V2M_SERVE_API_KEYS"].startswith("${V2M_SERVE_API_KEYS:?")  # required: no open serve on 0.0.0.0
    assert env["MLFLOW_TRACKING_USERNAME"] == "serve" and env["MLFLOW_TRACKING_PASSWORD"].startswith(
        "${MLFLOW_SERVE_PASSWORD:?")
    assert "MLFLOW_SERVE_PASSWORD" in services["init"]["environment"]  # init creates the serve user
    assert "default_permission = READ" in " ".join(services["mlflow"]["command"])  # so serve can only read
    assert serve["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert "/readyz" in " ".join(serve["healthcheck"]["test"])
    assert (ROOT / serve["build"]["dockerfile"]).is_file()
    broken = tmp_path / "compose.yml"
    broken.write_text(COMPOSE.read_text().replace("  serve:", "  serve:\n    replicaz: 2", 1))
    assert compose_validate(broken).returncode != 0
