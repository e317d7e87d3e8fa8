# syntax=docker/dockerfile:1
# Worker image: Ray 2.60 (Jobs API, Train) + torch with CUDA + triton + the project (workers/, rcm_core/). Every
# Ray node runs it: the compose stack's ray-head and ray-worker(s), the ray-jobs overlay's RayCluster and each
# RayJob of the kuberay backend (KUBERAY_IMAGE). Build from the repository root:
#   docker build -f deploy/docker/ray.Dockerfile -t rcm-ray:0.1.0 .
# Never built on the project's machines (no Docker engine there); tests/deploy checks the COPY sources exist.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY rcm_core ./rcm_core
COPY workers ./workers
COPY service ./service
COPY rcm_client ./rcm_client
# Every version from constraints.txt. From PyPI, torch==2.13.0 is the CUDA build: the CUDA runtime arrives as
# nvidia-* wheels that torch pins exactly, and the host supplies only the driver (NVIDIA Container Toolkit).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
# wget: KubeRay's default liveness/readiness probes run `wget` against the raylet's and dashboard's health
# endpoints; bash: KubeRay starts Ray through `bash -c`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 rcm
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /home/rcm
# A job's `python -m workers.entrypoint` resolves python from PATH: the venv's (RUNBOOK).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
# The local raylet's health endpoint (dashboard agent, every node; public even with token auth).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:52365/api/local_raylet_healthz"]
# Compose and KubeRay both replace this command; alone, the image starts a single-node head.
CMD ["ray", "start", "--head", "--block", "--dashboard-host=0.0.0.0", "--disable-usage-stats"]
