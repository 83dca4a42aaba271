"""infra/ holds what production runs (no Docker or Kubernetes here): it must parse and have the keys
the deployment relies on. prefect.yaml's deployments must point at flows that exist."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_defines_the_team_stack_bound_to_loopback_without_secrets() -> None:
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "s3", "mlflow", "prefect", "worker-cpu", "worker-gpu-a40"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "postgresql://" in " ".join(services["mlflow"]["command"].split())
    assert "--artifacts-destination s3://" in " ".join(services["mlflow"]["command"].split())
    gpu = services["worker-gpu-a40"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    text = (ROOT / "infra" / "docker-compose.yml").read_text()
    assert "${AWS_SECRET_ACCESS_KEY" in text and "${POSTGRES_PASSWORD" in text  # from the environment only


def test_gpu_worker_image_installs_the_project_with_its_ml_extra() -> None:
    lines = (ROOT / "infra" / "worker-gpu.Dockerfile").read_text().splitlines()
    assert lines[[i for i, l in enumerate(lines) if l.startswith("FROM")][0]].split()[1].startswith("pytorch/pytorch:")
    assert any('pip install ".[ml' in l for l in lines)
    assert any("--pool\", \"gpu-a40\"" in l for l in lines if l.startswith("CMD"))


def test_kubernetes_template_requests_a40_gpus() -> None:
    tpl = json.loads((ROOT / "infra" / "work-pools" / "gpu-a40-kubernetes.json").read_text())
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "{{ gpu_product }}"
    assert tpl["variables"]["properties"]["gpu_product"]["default"] == "NVIDIA-A40"
    for var in ("image", "gpu_count", "namespace"):
        assert var in tpl["variables"]["properties"], var


def test_process_template_passes_gpu_job_variables_as_environment() -> None:
    tpl = json.loads((ROOT / "infra" / "work-pools" / "gpu-a40-process.json").read_text())
    env = tpl["job_configuration"]["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "{{ cuda_visible_devices }}" and env["V2M_DEVICE"] == "{{ device }}"
    assert {"gpu_count", "device", "cuda_visible_devices"} <= set(tpl["variables"]["properties"])


def test_prefect_yaml_deployments_point_at_real_flows_and_pools() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"retrain-scheduled", "retrain-manual", "data-watch", "prepare-data", "finetune", "evaluate",
            "promote"} <= set(deployments)
    assert deployments["retrain-scheduled"]["schedules"][0]["cron"]
    assert "interval" in deployments["data-watch"]["schedules"][0]
    for name in ("finetune", "evaluate"):
        assert deployments[name]["work_pool"]["name"] == "gpu-a40"
        assert deployments[name]["work_pool"]["job_variables"]["gpu_count"] == 1
    for d in deployments.values():
        module, _, attr = d["entrypoint"].partition(":")
        fn = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        assert hasattr(fn, "deploy"), d["entrypoint"]  # a Prefect flow
    assert deployments["retrain-manual"]["concurrency_limit"] == 1
