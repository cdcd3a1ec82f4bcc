# The cloud hub: API, MQTT bridge, cloud model. Build from the repository's root:
#   docker build -f deploy/docker/hub.Dockerfile -t cloud-hub:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleet ./fleet
COPY edge_agent ./edge_agent
COPY cloud_hub ./cloud_hub
COPY models ./models
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[hub,postgres]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EHI_HUB_CLOUD_BUNDLE=/opt/ehi/bundles/digits-cloud \
    EHI_HUB_ARTIFACTS_DIR=/var/lib/cloud-hub/artifacts
# The hub's keys (assignment signing, token secret) come from mounted Secrets; their paths are
# set by the deployment (deploy/k3s), not baked into the image.
RUN groupadd --system --gid 10001 hub \
    && useradd --system --uid 10001 --gid hub --home-dir /var/lib/cloud-hub --no-create-home hub \
    && mkdir -p /var/lib/cloud-hub \
    && chown hub:hub /var/lib/cloud-hub
COPY --from=build /opt/venv /opt/venv
COPY models/bundles/digits-cloud /opt/ehi/bundles/digits-cloud
USER 10001:10001
WORKDIR /var/lib/cloud-hub
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["cloud-hub"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
