"""What every request passes before its route: the body limit, the caller's token and role
(cloud_hub/auth.py), the rate limit, and after it the audit log of changes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cloud_hub.auth import (
    ANONYMOUS,
    Authenticator,
    AuthError,
    Principal,
    audit_record,
    required_role,
)
from cloud_hub.core.config import HubSettings
from cloud_hub.db import AuditEntry
from cloud_hub.rate_limit import RateLimiter, retry_after

log = logging.getLogger(__name__)
audit_log = logging.getLogger("cloud_hub.audit")

UPLOAD_PATH = "/v1/models"  # streams its body against max_bundle_bytes itself
READS = ("GET", "HEAD", "OPTIONS")


def install(app: FastAPI, settings: HubSettings) -> None:
    a = settings.auth
    token = settings.api_token.get_secret_value() if settings.api_token else None
    auth = Authenticator(a, token)
    limiter = RateLimiter(a.rate_per_s, a.burst)
    app.state.auth = auth

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        method, path = request.method, request.url.path
        client = request.client.host if request.client else None
        if method not in READS and path != UPLOAD_PATH:
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return _error(411, "send a Content-Length (chunked bodies are refused)")
            if length is not None and (not length.isdigit() or int(length) > a.max_body_bytes):
                return _error(413, f"body of {length} bytes exceeds the {a.max_body_bytes}-"
                                   "byte limit (EHI_HUB_AUTH__MAX_BODY_BYTES)")
        need = required_role(method, path, a.open_downloads)
        if a.mode == "open":  # before roles: reads open, writes need the API token if set
            need = None if method in READS or token is None else "operator"
        principal: Principal = ANONYMOUS
        try:
            principal = auth.principal(request.headers.get("authorization")) \
                if need is not None or request.headers.get("authorization") else ANONYMOUS
            if not principal.allows(need):
                raise AuthError(
                    f"this needs the role {need!r}; you are "
                    f"{principal.role or 'anonymous'}" + (
                        " (send a token: fleet login, or $EHI_FLEET_TOKEN)"
                        if principal.role is None else ""),
                    401 if principal.role is None else 403)
        except AuthError as exc:
            response = _error(exc.status, str(exc),
                              {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
            await _audit(request, principal, method, path, exc.status, client)
            return response
        if need is not None:
            wait = limiter.take(principal.subject if principal.role else f"ip:{client}")
            if wait > 0:
                app.state.metrics.rate_limited.inc()
                return _error(429, "too many requests: slow down",
                              {"Retry-After": retry_after(wait)})
        request.state.principal = principal
        response = await call_next(request)
        if method not in READS:
            await _audit(request, principal, method, path, response.status_code, client)
        return response

    async def _audit(request: Request, principal: Principal, method: str, path: str,
                     status: int, client: str | None) -> None:
        entry = audit_record(principal, method, path, status, client)
        audit_log.info("%s %s %s by %s (%s) from %s", status, method, path, principal.subject,
                       principal.role or "anonymous", client)
        sessions = getattr(request.app.state, "sessions", None)
        if sessions is None:
            return

        def write() -> None:
            try:
                with sessions.begin() as s:
                    s.add(AuditEntry(**entry))
            except Exception as exc:  # the audit must not take the request down
                log.error("audit entry not stored: %s", exc)

        await run_in_threadpool(write)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)
