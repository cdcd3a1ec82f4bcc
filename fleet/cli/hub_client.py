"""The hub's REST API as the fleet tools use it: one small client, errors with their status.

The token (for hubs with `EHI_HUB_API_TOKEN`) comes from `$EHI_FLEET_TOKEN` unless given.
"""

from __future__ import annotations

import os
from typing import Any

from fleet.contract.errors import FleetError

TOKEN_ENV = "EHI_FLEET_TOKEN"
# An upload of a large bundle to a busy hub may take this long.
TIMEOUT_S = 60.0


class HubClientError(FleetError):
    """The hub refused a request (`status` >= 400) or could not be reached (`status` 0)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class HubClient:
    """`transport`: an httpx transport to use instead of the network (tests pass an
    `httpx.MockTransport` where a real hub is not the point)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = TIMEOUT_S,
                 transport: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """The JSON answer; raises HubClientError with the hub's own explanation."""
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise HubClientError(f"cannot reach the hub at {self.url}: {exc}", 0) from None
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text}
        if r.status_code >= 400:
            detail = body.get("detail", body) if isinstance(body, dict) else body
            raise HubClientError(f"{detail}", r.status_code)
        return body

    def get(self, path: str, **params: Any) -> Any:
        given = {k: v for k, v in params.items() if v is not None}
        # An empty params mapping would replace a query written into `path` (httpx merges
        # only what it is given): pass none at all then.
        return self.request("GET", path, **({"params": given} if given else {}))

    def post(self, path: str, json: Any = None, content: bytes | None = None) -> Any:
        if content is not None:
            return self.request("POST", path, content=content,
                                headers={"Content-Type": "application/gzip"})
        return self.request("POST", path, json=json)

    def put(self, path: str, json: Any) -> Any:
        return self.request("PUT", path, json=json)
