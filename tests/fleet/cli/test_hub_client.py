"""The hub client's error handling, against an in-memory transport (no hub needed)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from fleet.cli.hub_client import HubClient, HubClientError


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> HubClient:
    return HubClient("http://hub.test", token="t0k", transport=httpx.MockTransport(handler))


def test_answers_errors_and_the_token() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        if req.url.path == "/v1/devices":
            return httpx.Response(200, json=[{"id": "cam-1"}])
        if req.url.path == "/v1/results":
            return httpx.Response(200, json=dict(req.url.params))
        if req.url.path == "/v1/models":
            return httpx.Response(422, json={"detail": "not a tar archive"})
        return httpx.Response(500, text="boom")

    with _client(handler) as c:
        assert c.get("/v1/devices") == [{"id": "cam-1"}]
        # A query in the path survives; keyword parameters join it, None ones are left out.
        assert c.get("/v1/results?limit=5&cursor=3") == {"limit": "5", "cursor": "3"}
        assert c.get("/v1/results", device="d", since=None) == {"device": "d"}
        with pytest.raises(HubClientError, match="not a tar archive") as e:
            c.post("/v1/models", content=b"x")
        assert e.value.status == 422
        with pytest.raises(HubClientError, match="boom") as e:
            c.get("/v1/other")
        assert e.value.status == 500
    assert seen[0].headers["Authorization"] == "Bearer t0k"


def test_unreachable_hub_is_status_zero() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    with _client(handler) as c, pytest.raises(HubClientError, match="cannot reach") as e:
        c.get("/v1/devices")
    assert e.value.status == 0
