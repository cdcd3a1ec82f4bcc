"""The API's tokens and roles, its rate limit, body limits and audit log (on SQLite and
PostgreSQL)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from cloud_hub.auth import required_role
from cloud_hub.core.config import HubSettings
from cloud_hub.main import create_app
from models import CLOUD_BUNDLE


def _app(tmp_path: Path, database_url: str, **auth: Any) -> TestClient:
    settings = HubSettings(cloud_bundle=CLOUD_BUNDLE, database_url=database_url,
                           artifacts_dir=tmp_path / "artifacts",
                           assignment_key=tmp_path / "hub.key",
                           auth={"secret_file": tmp_path / "jwt.secret", **auth})
    return TestClient(create_app(settings, with_bridge=False))


@pytest.fixture
def hub(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    with _app(tmp_path, database_url, mode="jwt") as c:
        yield c


def _bearer(c: TestClient, role: str, subject: str = "alice", ttl: float = 600) -> dict[str, str]:
    return {"Authorization": f"Bearer {c.app.state.auth.issue(subject, role, ttl)}"}  # type: ignore[attr-defined]


def test_every_role_gets_what_it_needs_and_no_more(hub: TestClient) -> None:
    viewer, operator, admin = (_bearer(hub, r, r) for r in ("viewer", "operator", "admin"))
    labels = {"labels": {"site": "x"}}
    # Anonymous: only the probes and what devices fetch.
    assert hub.get("/v1/results").status_code == 401
    assert hub.get("/v1/results").headers["www-authenticate"] == "Bearer"
    assert hub.put("/v1/devices/d1/labels", json=labels).status_code == 401
    for path in ("/healthz", "/v1/keys", "/openapi.json"):
        assert hub.get(path).status_code == 200, path
    # viewer: reads, not changes, not raw device data, not the audit log.
    assert hub.get("/v1/results", headers=viewer).status_code == 200
    assert hub.get("/v1/stats", headers=viewer).status_code == 200
    assert hub.put("/v1/devices/d1/labels", json=labels, headers=viewer).status_code == 403
    assert hub.get("/v1/hard-examples/x/input", headers=viewer).status_code == 403
    assert hub.get("/v1/audit", headers=viewer).status_code == 403
    # operator: changes (the device is unknown: 404 from the route, past the guard).
    assert hub.put("/v1/devices/d1/labels", json=labels, headers=operator).status_code == 404
    assert hub.get("/v1/hard-examples/x/input", headers=operator).status_code == 404
    assert hub.get("/v1/audit", headers=operator).status_code == 403
    assert hub.post("/v1/tokens", json={"subject": "bob", "role": "viewer"},
                    headers=operator).status_code == 403
    # admin: tokens for others, and the audit of every change and refused attempt.
    r = hub.post("/v1/tokens", json={"subject": "bob", "role": "viewer"}, headers=admin)
    assert r.status_code == 201
    bob = {"Authorization": f"Bearer {r.json()['token']}"}
    assert hub.get("/v1/whoami", headers=bob).json() == {"subject": "bob", "role": "viewer",
                                                         "via": "jwt"}
    log = hub.get("/v1/audit", headers=admin).json()["items"]
    seen = [(e["subject"], e["method"], e["path"], e["status"]) for e in log]
    assert ("anonymous", "PUT", "/v1/devices/d1/labels", 401) in seen
    assert ("viewer", "PUT", "/v1/devices/d1/labels", 403) in seen
    assert ("operator", "PUT", "/v1/devices/d1/labels", 404) in seen
    assert ("admin", "POST", "/v1/tokens", 201) in seen
    assert all(e["method"] != "GET" or e["status"] in (401, 403) for e in log)


def test_tokens_that_do_not_hold_are_refused(hub: TestClient, tmp_path: Path) -> None:
    secret = (tmp_path / "jwt.secret").read_text().strip()
    now = int(time.time())
    good = {"sub": "a", "role": "admin", "aud": "ehi-hub", "iss": "cloud-hub", "exp": now + 60}
    cases = {
        "expired": jwt.encode({**good, "exp": now - 5}, secret, algorithm="HS256"),
        "other secret": jwt.encode(good, "not-the-hubs-secret-at-all-32-bytes!", algorithm="HS256"),
        "other audience": jwt.encode({**good, "aud": "other"}, secret, algorithm="HS256"),
        "no expiry": jwt.encode({k: v for k, v in good.items() if k != "exp"}, secret,
                                algorithm="HS256"),
        "alg none": jwt.encode(good, "", algorithm="none"),
        "garbage": "not.a.jwt",
    }
    for name, token in cases.items():
        r = hub.get("/v1/results", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, name
    assert hub.get("/v1/results", headers={"Authorization": "Basic abc"}).status_code == 401
    ok = jwt.encode(good, secret, algorithm="HS256")
    assert hub.get("/v1/results", headers={"Authorization": f"Bearer {ok}"}).status_code == 200
    # A token with no known role gets nothing but the open routes.
    nobody = jwt.encode({**good, "role": "root"}, secret, algorithm="HS256")
    assert hub.get("/v1/results", headers={"Authorization": f"Bearer {nobody}"}
                   ).status_code == 401


def test_an_oidc_issuers_tokens_are_verified_with_its_keys(tmp_path: Path,
                                                           database_url: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1",
                                                              "use": "sig", "alg": "ES256"}]}))
    with _app(tmp_path, database_url, mode="jwt", jwks_file=tmp_path / "jwks.json",
              issuer="https://login.example.com/") as hub:
        claims = {"sub": "carol@example.com", "roles": ["viewer", "operator"],
                  "aud": "ehi-hub", "iss": "https://login.example.com/",
                  "exp": int(time.time()) + 60}
        token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"})
        h = {"Authorization": f"Bearer {token}"}
        assert hub.get("/v1/whoami", headers=h).json() == {
            "subject": "carol@example.com", "role": "operator", "via": "oidc"}
        other = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": "k1"})
        assert hub.get("/v1/results", headers={"Authorization": f"Bearer {forged}"}
                       ).status_code == 401
        wrong_iss = jwt.encode({**claims, "iss": "https://evil.example.com/"}, key,
                               algorithm="ES256", headers={"kid": "k1"})
        assert hub.get("/v1/results", headers={"Authorization": f"Bearer {wrong_iss}"}
                       ).status_code == 401


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, database_url: str) -> None:
    with _app(tmp_path, database_url, mode="jwt", rate_per_s=0.5, burst=3) as hub:
        h = _bearer(hub, "viewer")
        codes = [hub.get("/v1/results/count", headers=h).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = hub.get("/v1/results/count", headers=h)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # Another caller has a bucket of its own; the probes are never limited.
        assert hub.get("/v1/results/count", headers=_bearer(hub, "viewer", "bob")
                       ).status_code == 200
        assert all(hub.get("/healthz").status_code == 200 for _ in range(10))


def test_bodies_are_bounded_on_every_route(hub: TestClient) -> None:
    h = _bearer(hub, "operator")
    big = json.dumps({"labels": {"k": "v" * (2 << 20)}})
    r = hub.put("/v1/devices/d1/labels", content=big, headers={**h, "Content-Type":
                                                               "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"labels": {}}'

    r = hub.put("/v1/devices/d1/labels", content=chunks(), headers=h)
    assert r.status_code == 411


def test_open_mode_keeps_the_single_write_token(tmp_path: Path, database_url: str) -> None:
    settings = HubSettings(cloud_bundle=CLOUD_BUNDLE, database_url=database_url,
                           artifacts_dir=tmp_path / "a", assignment_key=tmp_path / "hub.key",
                           api_token="s3cret")
    with TestClient(create_app(settings, with_bridge=False)) as hub:
        assert hub.get("/v1/results").status_code == 200
        labels = {"labels": {"a": "b"}}
        assert hub.put("/v1/devices/d1/labels", json=labels).status_code == 401
        assert hub.put("/v1/devices/d1/labels", json=labels,
                       headers={"Authorization": "Bearer s3cret"}).status_code == 404
        assert hub.put("/v1/devices/d1/labels", json=labels,
                       headers={"Authorization": "Bearer wrong"}).status_code == 401


@pytest.mark.parametrize("method, path, need", [
    ("GET", "/healthz", None), ("GET", "/metrics", None), ("GET", "/v1/keys", None),
    ("GET", "/v1/models/digits-edge/2/files/model.onnx", None),
    ("GET", "/v1/models", "viewer"), ("GET", "/v1/devices", "viewer"),
    ("GET", "/v1/hard-examples/abc/input", "operator"), ("POST", "/v1/models", "operator"),
    ("PUT", "/v1/devices/x/desired", "operator"), ("GET", "/v1/audit", "admin"),
    ("POST", "/v1/tokens", "admin"),
])
def test_the_role_each_route_needs(method: str, path: str, need: str | None) -> None:
    assert required_role(method, path, open_downloads=True) == need
