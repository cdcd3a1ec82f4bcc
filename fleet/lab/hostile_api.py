"""Hostile requests for the hub's API, generated from its own OpenAPI schema and mutated the way
`hostile_messages` mutates the wire (huge and out-of-range numbers, non-finite numbers, deep
nesting, lone surrogates, NUL, trailing newlines, over-long strings, wrong types, paths that
climb): what `bench/security.py` sends to every route, and the rate-limit checks.
"""

from __future__ import annotations

import collections
import random
from typing import Any
from urllib.parse import quote

import httpx

from fleet.lab.hostile_messages import Raw, dumps_raw

# Replacement values for a path or query parameter (URL text).
PARAM_MUTATIONS: tuple[str, ...] = (
    str(10**30), str(-(2**63) - 1), str(2**64), "-1", "0", "inf", "nan", "1e999", "",
    "x" * 5000, "a%00b", "a%0A", "dev-0%0A", "..", "../../etc/passwd", "%2e%2e", "%ED%A0%80",
    "%FF%FE", "é" * 70, "[1]", "{}", "true", "null", "1.5",
)
# Replacement values for a JSON body field.
BODY_MUTATIONS: tuple[Any, ...] = (
    10**30, -(2**63) - 1, 2**63, -1, 0, Raw("NaN"), Raw("Infinity"), Raw("-1e999"),
    Raw('"a\\ud800b"'), Raw('"\\udfff"'), "a\x00b", "dev\n", "x" * 100_000, [], {}, True, None,
    1.5, Raw("[" * 3000 + "]" * 3000), Raw("[" * 30 + "]" * 30), list(range(20_000)),
    {"a": {"b": {"c": 1}}}, "../../x", "é" * 200,
)


def _resolve(schema: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        s = schema["components"]["schemas"][name]
    return s


def example(schema: dict[str, Any], s: dict[str, Any], depth: int = 0) -> Any:
    """A plausible value for the JSON schema `s`."""
    s = _resolve(schema, s)
    if depth > 4:
        return None
    for key in ("anyOf", "oneOf"):
        if key in s:
            return example(schema, s[key][0], depth + 1)
    if "enum" in s:
        return s["enum"][0]
    if "default" in s:
        return s["default"]
    t = s.get("type")
    if t == "object" or "properties" in s:
        return {k: example(schema, v, depth + 1) for k, v in s.get("properties", {}).items()}
    if t == "array":
        return [example(schema, s.get("items", {}), depth + 1)]
    if t == "integer":
        return max(1, int(s.get("minimum", 1)))
    if t == "number":
        return 0.5
    if t == "boolean":
        return False
    return "dev-0" if "pattern" in s else "x"


def requests_from_schema(schema: dict[str, Any], n: int, rng: random.Random
                         ) -> list[tuple[str, str, dict[str, str], bytes | None]]:
    """`n` requests over every operation, in turn: (method, url path, query, JSON body)."""
    ops = [(path, method.upper(), op) for path, item in schema["paths"].items()
           for method, op in item.items()]
    out = []
    for i in range(n):
        path, method, op = ops[i % len(ops)]
        params = {p["name"]: (p["in"], example(schema, p.get("schema", {})))
                  for p in op.get("parameters", [])}
        body_schema = (op.get("requestBody") or {}).get("content", {}) \
            .get("application/json", {}).get("schema")
        body: Any = example(schema, body_schema) if body_schema else None
        # Break one thing: a parameter, a body field, or the whole body.
        targets = [("param", k) for k in params] + \
            ([("field", k) for k in body] if isinstance(body, dict) else []) + \
            ([("body", "")] if body_schema else [])
        values = {k: quote(str(v), safe="") for k, (_where, v) in params.items()}
        if targets and rng.random() < 0.95:
            what, key = rng.choice(targets)
            if what == "param":
                values[key] = rng.choice(PARAM_MUTATIONS)
            elif what == "field":
                body[key] = rng.choice(BODY_MUTATIONS)
            else:
                body = rng.choice(BODY_MUTATIONS)
        url = path
        query = {}
        for k, (where, _v) in params.items():
            if where == "path":
                url = url.replace("{" + k + "}", values[k])
            else:
                query[k] = values[k]
        raw = dumps_raw(body).encode("utf-8", "surrogatepass") if body_schema else None
        out.append((method, url, query, raw))
    return out


def fuzz_api(client: httpx.Client, n: int, rng: random.Random) -> dict[str, Any]:
    """Send `n` hostile requests over every route; count statuses, 5xx and dropped ones."""
    schema = client.get("/openapi.json").json()
    statuses: collections.Counter[int] = collections.Counter()
    five_xx: list[str] = []
    dropped = 0
    routes = set()
    for method, url, query, body in requests_from_schema(schema, n, rng):
        routes.add((method, url.split("?")[0]))
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        try:
            r = client.request(method, url + ("?" + qs if qs else ""), content=body,
                               headers={"Content-Type": "application/json"} if body else None)
        except httpx.HTTPError as exc:
            dropped += 1
            five_xx.append(f"{method} {url[:80]}: {type(exc).__name__}")
            continue
        statuses[r.status_code] += 1
        if r.status_code >= 500:
            five_xx.append(f"{method} {url[:80]} -> {r.status_code}")
    ops = sum(len(v) for v in schema["paths"].values())
    return {"requests": n, "operations": ops, "statuses": dict(sorted(statuses.items())),
            "five_xx": len(five_xx) - dropped, "dropped": dropped, "examples": five_xx[:5]}


def refused_logins(url: str, attempts: int = 600) -> dict[str, Any]:
    """`attempts` requests with bad tokens from one address: how many were answered 401/403,
    how many 429 (the limit on refused attempts), any other."""
    statuses: collections.Counter[int] = collections.Counter()
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(attempts):
            r = c.get("/v1/devices", headers={"Authorization": f"Bearer not-a-token-{i}"})
            statuses[r.status_code] += 1
    return {"attempts": attempts, "statuses": dict(sorted(statuses.items())),
            "limited": statuses[429] > 0}


def open_mode_flood(url: str, reads: int = 600, writes: int = 300) -> dict[str, Any]:
    """Anonymous reads and writes as fast as one client goes against a hub in `open` mode."""
    statuses: collections.Counter[str] = collections.Counter()
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(reads):
            statuses[f"read {c.get('/v1/devices').status_code}"] += 1
        for _ in range(writes):
            r = c.put("/v1/devices/dev-0/labels", json={"labels": {"a": "b"}})
            statuses[f"write {r.status_code}"] += 1
    return {"reads": reads, "writes": writes, "statuses": dict(sorted(statuses.items())),
            "limited": statuses["read 429"] > 0 and statuses["write 429"] > 0}
