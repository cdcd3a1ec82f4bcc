"""Who am I, tokens for others (admin), and the audit log (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from cloud_hub.api.bounds import Cursor, Limit
from cloud_hub.api.deps import SessionDep, SettingsDep
from cloud_hub.auth import ANONYMOUS, AuthError, Role
from cloud_hub.db import AuditEntry

router = APIRouter(tags=["access"])


class TokenIn(BaseModel):
    subject: str = Field(min_length=1, max_length=128, pattern=r"^[\w.@+-]+$")
    role: Role
    ttl_s: float = Field(8 * 3600, gt=0, le=366 * 86400)


@router.get("/v1/whoami")
def whoami(request: Request) -> dict[str, Any]:
    p = getattr(request.state, "principal", ANONYMOUS)
    return {"subject": p.subject, "role": p.role, "via": p.via}


@router.post("/v1/tokens", status_code=201)
def issue_token(body: TokenIn, request: Request) -> dict[str, Any]:
    """A token for someone else (admin): `fleet login` takes it."""
    try:
        token = request.app.state.auth.issue(body.subject, body.role, body.ttl_s)
    except AuthError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"token": token, "subject": body.subject, "role": body.role, "ttl_s": body.ttl_s}


@router.get("/v1/audit")
def audit(session: SessionDep, settings: SettingsDep, cursor: Cursor = 0,
          limit: Limit = 100) -> dict[str, Any]:
    """Every change made through the API and every refused attempt, oldest first."""
    limit = min(limit, settings.max_page)
    rows = list(session.scalars(select(AuditEntry).where(AuditEntry.n > cursor)
                                .order_by(AuditEntry.n).limit(limit)))
    items = [{"n": r.n, "ts": r.ts, "subject": r.subject, "role": r.role, "via": r.via,
              "method": r.method, "path": r.path, "status": r.status, "client": r.client}
             for r in rows]
    return {"items": items, "next_cursor": rows[-1].n if len(rows) == limit else None}
