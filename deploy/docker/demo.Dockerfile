# CPU image that runs the 2-D rCM demo (`rcm demo`) of rcm_core alone, without the service: compose profile
# `demo` (docker compose --profile demo run --rm demo). The service's images are api, ray and mlflow.Dockerfile.
# Build from the repository root:
#   docker build -f deploy/docker/demo.Dockerfile -t rcm-demo .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY rcm_core ./rcm_core
COPY workers ./workers
COPY service ./service
# torch==2.13.0 from the CPU index: the default index serves a multi-GB CUDA build.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
       -c constraints.txt .

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 rcm
USER rcm
WORKDIR /home/rcm
ENV PATH=/opt/venv/bin:$PATH
HEALTHCHECK CMD ["rcm", "--help"]
CMD ["rcm", "demo", "--out", "/home/rcm/runs/demo"]
