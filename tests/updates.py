"""Helpers for the model-update tests: a fleet key and a hub key, derived bundle versions, a
hub serving its HTTP API from a thread, and signed assignments."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from cloud_hub.core.config import HubSettings
from cloud_hub.main import create_app
from fleet.contract.assignment import Assignment, encode_desired
from fleet.contract.bundle import MANIFEST_NAME, pack_bundle
from fleet.contract.signing import PrivateKey, PublicKey, generate_keys
from fleet.lab.bundle_copy import copy_bundle
from fleet.transport.ports import free_port
from models import CLOUD_BUNDLE, EDGE_BUNDLE

SERVER_START_S = 20.0


@dataclass
class UpdateKit:
    """A fleet signing key, a hub key, and bundle versions derived from the digits edge model."""

    root: Path
    key: Path = field(init=False)
    pub: PublicKey = field(init=False)
    hub_key: PrivateKey = field(init=False)
    _made: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.key = self.root / "fleet.key"
        self.pub = generate_keys(self.key, self.root / "fleet.pub")
        self.hub_key = PrivateKey.read_or_generate(self.root / "hub.key")

    def version(self, v: int, key: Path | str | None = "fleet", **changes: Any) -> Path:
        """`digits-edge` as version `v` with manifest `changes`, signed by the fleet key (or
        `key`: a path, or None for unsigned). The same arguments give the same folder."""
        k = self.key if key == "fleet" else key
        tag = hashlib.sha256(json.dumps([v, str(k), changes], sort_keys=True,
                                        default=str).encode()).hexdigest()[:10]
        if tag not in self._made:
            self._made[tag] = copy_bundle(EDGE_BUNDLE, self.root / f"v{v}-{tag}", version=v,
                                          key=k if isinstance(k, Path) else None,
                                          changes=changes)
        return self._made[tag]

    def assignment(self, device: str, bundle: Path, seq: int,
                   rollback: dict[str, Any] | None = None) -> bytes:
        manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        return encode_desired(Assignment(device, seq, time.time(), manifest, rollback),
                              self.hub_key)

    def update_settings(self, hub_url: str, **kw: Any) -> dict[str, Any]:
        return {"enabled": True, "hub_url": hub_url, "trusted_keys": [self.pub.to_text()],
                "hub_keys": [self.hub_key.public.to_text()], **kw}


class HubServer:
    """The hub's FastAPI app under uvicorn on a free port, in a thread of this process."""

    def __init__(self, settings: HubSettings, with_bridge: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, with_bridge=with_bridge)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="hub-http", daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        end = time.monotonic() + SERVER_START_S
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the hub's HTTP server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def push(self, bundle: Path) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models", content=pack_bundle(bundle), timeout=30)


def hub_settings(tmp: Path, kit: UpdateKit, **kw: Any) -> HubSettings:
    (tmp / "hub.key").parent.mkdir(parents=True, exist_ok=True)
    if not (tmp / "hub.key").exists():
        # The hub signs with the kit's hub key, which the agents pin.
        (tmp / "hub.key").write_bytes((kit.root / "hub.key").read_bytes())
    base: dict[str, Any] = dict(database_url=f"sqlite:///{tmp / 'hub.db'}",
                                artifacts_dir=tmp / "artifacts", assignment_key=tmp / "hub.key",
                                trusted_keys=[kit.pub.to_text()], cloud_bundle=CLOUD_BUNDLE)
    base.update(kw)
    return HubSettings(**base)
