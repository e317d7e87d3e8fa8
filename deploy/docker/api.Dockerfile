# syntax=docker/dockerfile:1
# Control-plane image: the FastAPI app and its reconciler (service/), without torch, ray or rcm_core: the
# service talks to Ray (Jobs API or KubeRay) over HTTP only. Also runs the compose stack's bucket-init job.
# Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t rcm-api:0.1.0 .
# Never built on the project's machines (no Docker engine there); tests/deploy checks that the COPY sources
# exist, that every package below is pinned in constraints.txt and that it covers every import of service/.

FROM python:3.11-slim AS build
WORKDIR /src
# What service/ imports, installed at the versions pinned in constraints.txt. Not `pip install .`: the
# project's dependencies include torch and ray, which the control plane never loads.
ARG SERVICE_PACKAGES="fastapi uvicorn pydantic pydantic-settings sqlalchemy alembic boto3 httpx pyyaml kubernetes psycopg[binary]"
COPY constraints.txt ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ${SERVICE_PACKAGES}
COPY pyproject.toml README.md ./
COPY service ./service
# Only service/ is in the build context copy, so the wheel holds the service package (and its migrations).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt .

FROM python:3.11-slim
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a runAsUser.
RUN useradd --create-home --uid 10001 rcm
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /home/rcm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Migrations run at start-up (service/main.py). One process: the reconciler thread must run exactly once.
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]
