"""Who may call the hub's API: bearer tokens (JWT) with a role, a rate limit per caller, and
the rule that says which role each route needs.

Roles, each including the ones before it:
- viewer: every read (devices, results, statistics, models, rollouts);
- operator: every change (labels, assignments, offload settings, uploads, rollouts) and the raw
  inputs of hard examples (device data);
- admin: the audit log and issuing tokens.

Tokens are JWTs: issued by the hub itself (HS256 with its secret, `cloud-hub token`), or by an
OpenID Connect issuer whose public keys (a JWKS file) the hub is given. The claims used: `sub`
(who), `role` or `roles` (the highest counts), `exp` (required), `aud` (the hub's audience),
`iss` when an issuer is configured.

Open without a token, whatever the mode: `/healthz`, `/readyz`, `/metrics` (probes and
scrapers run inside the cluster; NetworkPolicies keep them there), the OpenAPI docs, and, with
`open_downloads` (the default), what devices fetch: `GET /v1/keys` and bundle files (bundles
are signed and checked on the device; their bytes are not the secret here).
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field

from cloud_hub.errors import HubError
from fleet.contract.protocol import short_text
from fleet.transport.strict_settings import Section

ROLES = ("viewer", "operator", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
Role = Literal["viewer", "operator", "admin"]
ALGORITHMS_EXTERNAL = ["RS256", "ES256", "PS256", "EdDSA"]


# A bearer token longer than this is refused unread (ours are about 300 characters; an issuer's
# with many claims a few thousand).
MAX_TOKEN_CHARS = 16_384


class AuthError(HubError):
    """A request without the credentials its route needs (401) or the role (403)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class AuthSettings(Section):
    """`EHI_HUB_AUTH__*`."""

    # "open": reads need nothing; writes need `api_token` if it is set (the behaviour before
    # roles). "jwt": every route but the open ones needs a token with the role it names.
    mode: Literal["open", "jwt"] = "open"
    # The hub's own signing secret for the tokens it issues; made on first start (mode 0600).
    secret_file: Path = Path("hub-jwt.secret")
    # An OpenID Connect issuer's public keys (JWKS JSON) and its `iss`; tokens it signs are
    # accepted beside the hub's own.
    jwks_file: Path | None = None
    issuer: str | None = None
    audience: str = "ehi-hub"
    # Devices download bundle files and the hub's key without a token.
    open_downloads: bool = True
    # Requests per second per caller (its token's subject, or its address without one), with
    # bursts of `burst`, in every mode and on every route but the probes; beyond it 429 with
    # Retry-After. 0: no limit.
    rate_per_s: float = Field(50.0, ge=0)
    burst: int = Field(200, ge=1)
    # Every request from one address, before its token is looked at (refused ones included):
    # what one address may cost the hub, whoever it claims to be. 0: no limit.
    address_rate_per_s: float = Field(200.0, ge=0)
    address_burst: int = Field(1000, ge=1)
    # Refused attempts (401, 403) from one address: beyond these, 429 without looking at the
    # token, and no audit row (a flood of bad tokens cannot grow or bury the audit log).
    refused_per_s: float = Field(1.0, ge=0)
    refused_burst: int = Field(20, ge=1)
    # Audit rows of refused attempts kept at most (the oldest go first); changes are all kept.
    audit_refused_max: int = Field(10_000, ge=100)
    # A request body larger than this is refused (413); bundle uploads have their own limit.
    max_body_bytes: int = Field(1 << 20, ge=1024)


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role | None   # None: anonymous
    via: str             # "jwt", "oidc", "token", "none"

    def allows(self, need: Role | None) -> bool:
        return need is None or (self.role is not None and RANK[self.role] >= RANK[need])


ANONYMOUS = Principal("anonymous", None, "none")


def required_role(method: str, path: str, open_downloads: bool) -> Role | None:
    """The role a request needs (None: open)."""
    if path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc") \
            or path.startswith("/docs/"):
        return None
    read = method in ("GET", "HEAD", "OPTIONS")
    if read and open_downloads and (path == "/v1/keys" or (
            path.startswith("/v1/models/") and "/files/" in path)):
        return None
    if path.startswith("/v1/audit") or path.startswith("/v1/tokens"):
        return "admin"
    if read and path.startswith("/v1/hard-examples/") and path.endswith("/input"):
        return "operator"
    return "viewer" if read else "operator"


def _jwt() -> Any:
    try:
        import jwt
    except ImportError:  # pragma: no cover - part of [hub]
        raise AuthError("tokens need PyJWT: pip install 'edge-hybrid-inference[hub]'",
                        500) from None
    return jwt


class Authenticator:
    def __init__(self, settings: AuthSettings, legacy_token: str | None = None) -> None:
        self.settings = settings
        self.legacy_token = legacy_token
        self.secret = _read_or_make_secret(settings.secret_file) if settings.mode == "jwt" \
            else None
        self.jwks: Any = None
        if settings.jwks_file is not None:
            self.jwks = _jwt().PyJWKSet.from_json(settings.jwks_file.read_text())

    def issue(self, subject: str, role: Role, ttl_s: float) -> str:
        if self.secret is None:
            raise AuthError("this hub issues tokens only with EHI_HUB_AUTH__MODE=jwt", 409)
        now = int(time.time())
        claims = {"sub": subject, "role": role, "iat": now, "exp": now + int(ttl_s),
                  "aud": self.settings.audience, "iss": "cloud-hub",
                  "jti": secrets.token_hex(8)}
        return str(_jwt().encode(claims, self.secret, algorithm="HS256"))

    def principal(self, authorization: str | None) -> Principal:
        """Who the Authorization header says the caller is; raises AuthError (401) for a
        token that does not hold."""
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("Authorization must be 'Bearer <token>'")
        if self.legacy_token is not None and hmac.compare_digest(token.encode(),
                                                                 self.legacy_token.encode()):
            return Principal("api-token", "admin", "token")
        if self.settings.mode != "jwt":
            raise AuthError("this token is not the hub's API token")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(f"token of {len(token)} characters (at most {MAX_TOKEN_CHARS})")
        try:
            return self._verify(token)
        except AuthError:
            raise
        except Exception as exc:
            raise AuthError(f"token refused: {type(exc).__name__}") from None

    def _verify(self, token: str) -> Principal:
        jwt = _jwt()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"not a JWT: {exc}") from None
        opts = {"require": ["exp", "sub"]}
        try:
            if header.get("alg") == "HS256":
                claims = jwt.decode(token, self.secret, algorithms=["HS256"],
                                    audience=self.settings.audience, issuer="cloud-hub",
                                    options=opts)
                via = "jwt"
            elif self.jwks is not None:
                key = self.jwks[header.get("kid", "")] if header.get("kid") else \
                    self.jwks.keys[0]
                claims = jwt.decode(token, key, algorithms=ALGORITHMS_EXTERNAL,
                                    audience=self.settings.audience,
                                    issuer=self.settings.issuer, options=opts)
                via = "oidc"
            else:
                raise AuthError(f"a token signed with {header.get('alg')!r} and no issuer keys "
                                "configured (EHI_HUB_AUTH__JWKS_FILE)")
        except (jwt.PyJWTError, KeyError) as exc:
            raise AuthError(f"token refused: {str(exc)[:200]}") from None
        roles = claims.get("roles", claims.get("role", []))
        roles = [roles] if isinstance(roles, str) else roles
        # A claim of another shape grants nothing (it is a token, not a request to refuse).
        known = [r for r in roles if isinstance(r, str) and r in RANK] \
            if isinstance(roles, list) else []
        role = cast(Role, max(known, key=RANK.__getitem__)) if known else None
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("token refused: its subject ('sub') must be a non-empty string")
        return Principal(short_text(sub, 128), role, via)


def _read_or_make_secret(path: Path) -> bytes:
    from fleet.transport.tls import SecretFileError, read_secret, write_secret

    with contextlib.suppress(FileExistsError):  # made once; another replica may race us
        write_secret(path, (secrets.token_urlsafe(48) + "\n").encode())
    try:
        return read_secret(path).encode()
    except SecretFileError as exc:
        raise AuthError(str(exc), 500) from None


def audit_record(principal: Principal, method: str, path: str, status: int,
                 client: str | None) -> dict[str, Any]:
    return {"ts": time.time(), "subject": principal.subject, "role": principal.role,
            "via": principal.via, "method": method, "path": path[:512], "status": status,
            "client": client}


