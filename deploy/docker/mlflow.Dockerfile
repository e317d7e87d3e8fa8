# syntax=docker/dockerfile:1
# MLflow tracking server: metadata in PostgreSQL (psycopg), artifacts in S3 (boto3), versions from
# constraints.txt (mlflow==3.17.2: 3.18.0 does not resolve, RUNBOOK). Configured by MLFLOW_* variables
# (compose and deploy/kubernetes/base/mlflow.yaml). Build from the repository root:
#   docker build -f deploy/docker/mlflow.Dockerfile -t rcm-mlflow:0.1.0 .
# Never built on the project's machines (no Docker engine there); tests/deploy checks the COPY sources exist.

FROM python:3.11-slim AS build
WORKDIR /src
COPY constraints.txt ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt mlflow boto3 "psycopg[binary]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 rcm
COPY --from=build /opt/venv /opt/venv
USER 10001
WORKDIR /home/rcm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    MLFLOW_DISABLE_TELEMETRY=true
EXPOSE 5000
# /health is exempt from MLflow's Host-header check, so this works whatever MLFLOW_SERVER_ALLOWED_HOSTS says.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=2)"]
CMD ["mlflow", "server"]
