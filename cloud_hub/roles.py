"""What a hub process takes from the devices, by role.

"answer" subscribes to offloads and answers them with the cloud model; "store" subscribes to
everything devices send to be kept (results, hard examples, telemetry, status, reports). A
process holds one role or both (the default). Run apart, the answer path has an interpreter of
its own, where a burst of results never holds its GIL; replicas of each role split their
channels through the shared subscriptions (docs/architecture.md).
"""

from __future__ import annotations

from fleet.contract import protocol as p

ROLE_CHANNELS: dict[str, frozenset[p.Channel]] = {
    "answer": frozenset({p.Channel.OFFLOAD}),
    "store": frozenset({p.Channel.RESULTS, p.Channel.HARD, p.Channel.TELEMETRY,
                        p.Channel.STATUS, p.Channel.REPORTED}),
}
ALL_ROLES = frozenset(ROLE_CHANNELS)


def parse_roles(spec: str) -> frozenset[str]:
    """Roles from "answer,store"; raises ValueError naming the known ones."""
    names = frozenset(r.strip() for r in spec.split(",") if r.strip())
    unknown = sorted(names - ALL_ROLES)
    if not names or unknown:
        raise ValueError(f"hub roles must be one or more of {sorted(ALL_ROLES)} separated by "
                         f"commas, got {spec!r}")
    return names


def channels_of(roles: frozenset[str]) -> frozenset[p.Channel]:
    """The channels a process of these roles subscribes to; raises ValueError for an empty or
    unknown role."""
    unknown = sorted(roles - ALL_ROLES)
    if not roles or unknown:
        raise ValueError(f"unknown hub roles {unknown}; choose one or more of "
                         f"{sorted(ALL_ROLES)}")
    return frozenset().union(*(ROLE_CHANNELS[r] for r in roles))
