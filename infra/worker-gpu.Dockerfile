# GPU worker image: a Prefect process worker that runs voice2music fine-tuning and evaluation on NVIDIA GPUs
# (A40 in the reference setup). Build from the repository root:
#   docker build -f infra/worker-gpu.Dockerfile -t voice2music-worker-gpu .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 \
    DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
RUN apt-get update && apt-get install -y --no-install-recommends git espeak-ng libfluidsynth3 libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/voice2music
COPY pyproject.toml README.md ./
COPY v2m v2m
COPY tasks tasks
COPY flows flows
COPY models models
# torch comes from the base image (CUDA build); the ml extra's range accepts it.
RUN pip install ".[ml,render]"
COPY params.yaml dvc.yaml prefect.yaml ./

# Real weights are never baked in: mount them or set the presets' `weights` to s3:// URIs.
VOLUME ["/opt/voice2music/.v2m"]
CMD ["prefect", "worker", "start", "--pool", "gpu-a40", "--type", "process", "--install-policy", "never"]
