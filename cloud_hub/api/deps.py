"""Dependencies of the API routes."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from cloud_hub.core.config import HubSettings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as s:
        yield s


def get_settings(request: Request) -> HubSettings:
    settings: HubSettings = request.app.state.settings
    return settings


def get_state(request: Request) -> Any:
    return request.app.state


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[HubSettings, Depends(get_settings)]
StateDep = Annotated[Any, Depends(get_state)]


def require_token(request: Request) -> None:
    """With `EHI_HUB_API_TOKEN` set, a request that changes anything needs it as a bearer
    token. Reads (and devices' downloads) stay open."""
    token = request.app.state.settings.api_token
    if token is None or request.method in ("GET", "HEAD", "OPTIONS"):
        return
    got = request.headers.get("authorization", "")
    want = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(got.encode(), want.encode()):
        raise HTTPException(401, "this hub needs a token for changes: set EHI_FLEET_TOKEN "
                                 "(sent as Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": "Bearer"})
