# `v2m serve` image: the HTTP service for the champion on one NVIDIA GPU. Build from the repository root:
#   docker build -f infra/serve.Dockerfile -t voice2music-serve .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/voice2music
COPY pyproject.toml README.md ./
COPY v2m v2m
COPY tasks tasks
COPY flows flows
COPY models models
# torch comes from the base image (CUDA build); the ml extra's range accepts it.
RUN pip install ".[ml,serve]"
COPY params.yaml ./

EXPOSE 8000
# 0.0.0.0 inside the container; compose publishes it on loopback, Kubernetes behind a Service. serve refuses
# to start on 0.0.0.0 without API keys (V2M_SERVE_API_KEYS); it reads the registry as MLflow's `serve` user
# (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and says which is missing if it cannot.
CMD ["v2m", "serve", "--host", "0.0.0.0", "--port", "8000"]
