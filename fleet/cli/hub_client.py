"""The hub's REST API as the fleet tools use it: one small client, errors with their status.

The bearer token comes from the caller, else `$EHI_FLEET_TOKEN`, else what `fleet login` saved
for this hub (`$XDG_CONFIG_HOME/edge-hybrid-inference/tokens.json`, mode 0600).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fleet.contract.errors import FleetError

TOKEN_ENV = "EHI_FLEET_TOKEN"
# An upload of a large bundle to a busy hub may take this long.
TIMEOUT_S = 60.0


def tokens_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edge-hybrid-inference" / "tokens.json"


def saved_tokens() -> dict[str, str]:
    try:
        d = json.loads(tokens_file().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}


def save_token(url: str, token: str | None) -> Path:
    """Remember (or, with None, forget) the token for hub `url`; the file is mode 0600."""
    tokens = saved_tokens()
    if token is None:
        tokens.pop(url.rstrip("/"), None)
    else:
        tokens[url.rstrip("/")] = token
    from fleet.transport.tls import write_secret

    path = tokens_file()
    write_secret(path, json.dumps(tokens, indent=2).encode(), replace=True)
    return path


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
        if token is None:
            token = os.environ.get(TOKEN_ENV) or saved_tokens().get(self.url)
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
