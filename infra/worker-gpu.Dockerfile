# Worker image for both pools (cpu and gpu-a40): Prefect, DVC, MLflow and the project's dependencies at the
# exact versions it was verified with (infra/constraints.txt). Flow runs clone the code they run at the
# deployment's commit (prefect.yaml pull steps); the copy installed here only provides the dependencies and
# the `v2m` command. Nothing is mounted: data, models, checkpoints and results move through S3 and MLflow.
# Build from the repository root:
#   docker build -f infra/worker-gpu.Dockerfile -t voice2music-worker:0.1.0 .
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
RUN apt-get update && apt-get install -y --no-install-recommends git espeak-ng libfluidsynth3 libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/voice2music
COPY pyproject.toml README.md ./
COPY infra/constraints.txt infra/constraints.txt
COPY v2m v2m
COPY tasks tasks
COPY flows flows
COPY models models
COPY infra/work-pools infra/work-pools
# torch==2.13.0 from PyPI is the CUDA build on Linux x86_64; the constraints pin every other package.
RUN pip install -c infra/constraints.txt ".[ml,render]"

RUN useradd --create-home v2m
USER v2m
WORKDIR /home/v2m
CMD ["prefect", "worker", "start", "--pool", "gpu-a40", "--type", "process", "--install-policy", "never"]
