# The edge agent: only the agent's extras (onnxruntime; OPENVINO=1 adds OpenVINO).
#   docker build -f deploy/docker/agent.Dockerfile -t edge-agent:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG OPENVINO=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleet ./fleet
COPY edge_agent ./edge_agent
COPY cloud_hub ./cloud_hub
COPY models ./models
RUN python -m venv /opt/venv \
    && extras="agent" && if [ "$OPENVINO" = "1" ]; then extras="agent,openvino"; fi \
    && /opt/venv/bin/pip install --no-cache-dir ".[${extras}]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EHI_AGENT_BUNDLE=/opt/ehi/bundles/digits-edge \
    EHI_AGENT_RESULTS__OUTBOX_DIR=/var/lib/edge-agent/outbox \
    EHI_AGENT_UPDATE__MODELS_DIR=/var/lib/edge-agent/models
RUN groupadd --system --gid 10002 agent \
    && useradd --system --uid 10002 --gid agent --home-dir /var/lib/edge-agent --no-create-home agent \
    && mkdir -p /var/lib/edge-agent \
    && chown agent:agent /var/lib/edge-agent
COPY --from=build /opt/venv /opt/venv
COPY models/bundles/digits-edge /opt/ehi/bundles/digits-edge
USER 10002:10002
WORKDIR /var/lib/edge-agent
EXPOSE 8750
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8750/healthz', timeout=2)"]
ENTRYPOINT ["edge-agent"]
CMD ["run"]
