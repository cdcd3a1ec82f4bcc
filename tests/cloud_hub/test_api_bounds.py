"""Numbers and names at the edge of the hub's API: what the database cannot hold, or a path
could misread, is a 422 naming the field, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud_hub.core.config import HubSettings
from cloud_hub.main import create_app
from models import CLOUD_BUNDLE

HUGE = str(1 << 64)


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(HubSettings(cloud_bundle=CLOUD_BUNDLE, database_url=database_url,
                                 artifacts_dir=tmp_path / "artifacts",
                                 assignment_key=tmp_path / "hub.key"), with_bridge=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("method, url", [
    ("GET", f"/v1/results?cursor={HUGE}"),
    ("GET", f"/v1/results?limit={HUGE}"),
    ("GET", "/v1/results?since=inf"),
    ("GET", "/v1/results?until=nan"),
    ("GET", "/v1/results/count?since=-inf"),
    ("GET", f"/v1/hard-examples?cursor={HUGE}"),
    ("GET", f"/v1/models/digits-edge/{HUGE}"),
    ("GET", "/v1/models/digits-edge/0"),
    ("GET", f"/v1/models/digits-edge/{HUGE}/files/model.onnx"),
    ("GET", "/v1/models/.digits-edge/1"),
    ("GET", f"/v1/rollouts/{HUGE}"),
    ("POST", f"/v1/rollouts/{HUGE}/pause"),
    ("POST", f"/v1/rollouts/{HUGE}/abort"),
    ("GET", "/v1/devices/.x"),
    ("GET", f"/v1/devices/{'d' * 65}"),
    ("GET", "/v1/stats?since=1e400"),
    ("GET", f"/v1/stats?device={'d' * 65}"),
    ("PUT", "/v1/devices/dev-1/desired"),
    ("POST", "/v1/rollouts"),
])
def test_out_of_range_inputs_are_422(client: TestClient, method: str, url: str) -> None:
    body = ({"model": "digits-edge", "version": 1 << 64} if method in ("PUT", "POST")
            and url.endswith(("desired", "rollouts")) else None)
    r = client.request(method, url, json=body)
    assert r.status_code == 422, (r.status_code, r.text)
    assert r.json()["detail"]  # names what was wrong


def test_in_range_inputs_still_work(client: TestClient) -> None:
    assert client.get("/v1/results?cursor=0&limit=10").status_code == 200
    assert client.get("/v1/models/digits-edge/1").status_code == 404
    assert client.get(f"/v1/rollouts/{(1 << 63) - 1}").status_code == 404
    assert client.get("/v1/stats?since=0&until=2000000000").status_code == 200
