"""What every request passes before its route: the rate limit per address (before anything
else), the body limit, the caller's token and role (cloud_hub/auth.py), a tighter limit on
refused attempts, the rate limit per caller, and after it the audit log of changes."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
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
from fleet.contract.errors import ProtocolError
from fleet.contract.protocol import parse_header, short_text

log = logging.getLogger(__name__)
audit_log = logging.getLogger("cloud_hub.audit")

UPLOAD_PATH = "/v1/models"  # streams its body against max_bundle_bytes itself
READS = ("GET", "HEAD", "OPTIONS")


# Routes the rate limits per caller leave out: probes and scrapes (kubelet, Prometheus), which
# still pass the limit per address.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# Every this many audit rows of refused attempts, the oldest beyond the cap are deleted.
AUDIT_PRUNE_EVERY = 100


def install(app: FastAPI, settings: HubSettings) -> None:
    a = settings.auth
    token = settings.api_token.get_secret_value() if settings.api_token else None
    auth = Authenticator(a, token)
    per_caller = RateLimiter(a.rate_per_s, a.burst)
    per_address = RateLimiter(a.address_rate_per_s, a.address_burst)
    refused = RateLimiter(a.refused_per_s, a.refused_burst)
    refused_rows = itertools.count(1)
    app.state.auth = auth

    def limited(wait: float, why: str) -> Any:
        app.state.metrics.rate_limited.inc()
        app.state.metrics.api_limited.labels(why).inc()
        return _error(429, "too many requests: slow down", {"Retry-After": retry_after(wait)})

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        method, path = request.method, request.url.path
        client = request.client.host if request.client else None
        address = f"ip:{client}"
        # Before anything is read: what one address may cost, whoever it claims to be.
        wait = per_address.take(address)
        if wait > 0:
            return limited(wait, "address")
        if "\x00" in path or "%00" in request.url.query:
            # No route takes a NUL, and PostgreSQL refuses one in any text it is compared with.
            return _error(422, "a NUL character in the path or query")
        if method not in READS and path != UPLOAD_PATH:
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return _error(411, "send a Content-Length (chunked bodies are refused)")
            if length is not None and (not length.isdigit() or int(length) > a.max_body_bytes):
                return _error(413, f"body of {length[:24]} bytes exceeds the "
                                   f"{a.max_body_bytes}-byte limit "
                                   "(EHI_HUB_AUTH__MAX_BODY_BYTES)")
            if "json" in request.headers.get("content-type", ""):
                # Held to the wire's bounds before a route reads it: no NUL or lone surrogate
                # (the database refuses both), integers within int64, finite numbers, a bounded
                # depth. Starlette keeps the body read here for the route.
                body = await request.body()
                if body:
                    try:
                        parse_header(body)
                    except ProtocolError as exc:
                        return _error(422, f"request body: {exc}")
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
            # Refused attempts have a tighter bucket per address; beyond it, no audit row.
            wait = refused.take(address)
            if wait > 0:
                return limited(wait, "refused")
            response = _error(exc.status, str(exc),
                              {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
            await _audit(request, principal, method, path, exc.status, client)
            return response
        if path not in PROBES:
            wait = per_caller.take(principal.subject if principal.role else address)
            if wait > 0:
                return limited(wait, "caller")
        request.state.principal = principal
        response = await call_next(request)
        if method not in READS:
            await _audit(request, principal, method, path, response.status_code, client)
        return response

    async def _audit(request: Request, principal: Principal, method: str, path: str,
                     status: int, client: str | None) -> None:
        entry = audit_record(principal, method, short_text(path, 512), status, client)
        audit_log.info("%s %s %s by %s (%s) from %s", status, method, path[:200],
                       principal.subject, principal.role or "anonymous", client)
        sessions = getattr(request.app.state, "sessions", None)
        if sessions is None:
            return
        prune = status in (401, 403) and next(refused_rows) % AUDIT_PRUNE_EVERY == 0

        def write() -> None:
            try:
                with sessions.begin() as s:
                    s.add(AuditEntry(**entry))
                    if prune:
                        prune_refused(s, a.audit_refused_max)
            except Exception as exc:  # the audit must not take the request down
                log.error("audit entry not stored: %s", exc)

        await run_in_threadpool(write)


def prune_refused(s: Session, keep: int) -> int:
    """Delete the audit rows of refused attempts (401, 403) beyond the newest `keep`."""
    refused = AuditEntry.status.in_((401, 403))
    cut = s.scalar(select(AuditEntry.n).where(refused).order_by(AuditEntry.n.desc())
                   .offset(keep).limit(1))
    if cut is None:
        return 0
    done: Any = s.execute(delete(AuditEntry).where(refused, AuditEntry.n <= cut))
    return int(done.rowcount or 0)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)
