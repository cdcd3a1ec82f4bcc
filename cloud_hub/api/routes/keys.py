"""The public keys a device pins: the hub's assignment key, and the fleet keys it trusts."""

from __future__ import annotations

from fastapi import APIRouter

from cloud_hub.api.deps import SettingsDep, StateDep

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.get("")
def get_keys(settings: SettingsDep, state: StateDep) -> dict[str, object]:
    """`assignment`: the hub's key (a device's `update.hub_keys`); `trusted_bundle_keys`: the
    fleet keys the registry accepts (a device's `update.trusted_keys`). Pin what you obtained
    over a channel you trust, not from this answer alone."""
    pub = state.hub_key.public
    return {"assignment": {"keyid": pub.keyid, "key": pub.to_text()},
            "trusted_bundle_keys": settings.trusted_keys}
