"""The fleet's identities on disk: the CA, every device and hub enrolled, who is revoked, and the
broker configuration generated from them.

    pki/
      ca.key ca.crt crl.pem         the certificate authority (ca.py)
      identities.json               every identity: kind, certificate serial, password hash,
                                    enrolled and revoked times
      devices/<id>/                 what a device needs: client.key client.crt ca.crt password
      hubs/<name>/                  the same for a hub replica
      broker/                       mosquitto.conf acl passwords server.key server.crt ca.crt
                                    crl.pem: regenerated on every enrolment and revocation

A device's MQTT username is its device id (its certificate's common name under mTLS); a hub's
is its hub name. Nothing in this folder but the device folders ever leaves the operator's
machine; a device folder goes to its one device.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fleet.contract.errors import ProtocolError
from fleet.contract.protocol import check_device_id
from fleet.identity.broker_config import BrokerMode, acl_text, mosquitto_conf
from fleet.identity.ca import CertificateAuthority, IdentityError, write_private
from fleet.identity.passwords import mosquitto_hash, new_password
from fleet.transport.tls import write_secret

Kind = Literal["device", "hub"]
INDEX = "identities.json"
PASSWORD_FILE = "password"
AGENT_MQTT_FILE = "agent-mqtt.toml"
HUB_ENV_FILE = "hub.env"
DEFAULT_HUB = "hub-0"


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What an enrolled identity was given: its folder (key, certificate, CA, password)."""

    name: str
    kind: Kind
    folder: Path
    serial: int

    @property
    def password(self) -> str:
        return (self.folder / PASSWORD_FILE).read_text().strip()


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertificateAuthority(root)

    @classmethod
    def init(cls, root: Path, broker_hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
             hubs: tuple[str, ...] = (DEFAULT_HUB,)) -> Pki:
        """A new CA, the broker's server certificate for `broker_hosts`, and the hubs'
        identities."""
        CertificateAuthority.create(root)
        pki = cls(root)
        pki.ca.issue("broker", root / "broker", "server", hosts=broker_hosts)
        # The hubs' shared-subscription group: a secret only hubs know (broker_config.py).
        pki._save({"devices": {}, "hubs": {}, "revoked_serials": [],
                   "share_group": "hubs-" + secrets.token_hex(16)})
        for h in hubs:
            pki.enroll(h, kind="hub")
        return pki

    # ------------------------------------------------------------------ the index

    def _load(self) -> dict[str, Any]:
        try:
            d: dict[str, Any] = json.loads((self.root / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IdentityError(f"cannot read {self.root / INDEX}: {exc}") from None
        return d

    def _save(self, d: dict[str, Any]) -> None:
        tmp = self.root / (INDEX + ".tmp")
        tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.root / INDEX)

    def identities(self, kind: Kind | None = None, active_only: bool = False
                   ) -> dict[str, dict[str, Any]]:
        d = self._load()
        out: dict[str, dict[str, Any]] = {}
        for k in ("devices", "hubs"):
            if kind is not None and k != kind + "s":
                continue
            for name, rec in d[k].items():
                if not active_only or rec.get("revoked_at") is None:
                    out[name] = {**rec, "kind": k[:-1]}
        return out

    # ------------------------------------------------------------------ enrolment

    def enroll(self, name: str, kind: Kind = "device", days: int = 825) -> Enrollment:
        """Issue `name` a key, a client certificate and a password; regenerate the broker's
        configuration. A revoked name may be enrolled again (a new key and password)."""
        try:
            check_device_id(name)
        except ProtocolError as exc:
            raise IdentityError(str(exc)) from None
        d = self._load()
        other = "hubs" if kind == "device" else "devices"
        if name in d[other]:
            raise IdentityError(f"{name!r} is already a {other[:-1]}: a device and a hub "
                                "cannot share a name")
        rec = d[kind + "s"].get(name)
        if rec is not None and rec.get("revoked_at") is None:
            raise IdentityError(f"{kind} {name!r} is already enrolled (revoke it first to "
                                "issue new credentials)")
        folder = self.root / (kind + "s") / name
        if folder.exists():  # what a revoked identity held: no longer valid, replaced
            for f in folder.iterdir():
                f.unlink()
        issued = self.ca.issue(name, folder, "client", days=days)
        password = new_password()
        write_private(folder / PASSWORD_FILE, (password + "\n").encode())
        d[kind + "s"][name] = {"serial": str(issued.serial), "password": mosquitto_hash(password),
                               "enrolled_at": time.time(), "revoked_at": None,
                               "not_after": issued.not_after.isoformat()}
        self._save(d)
        self.write_broker()
        self._write_settings(name, kind, folder, d)
        return Enrollment(name, kind, folder, issued.serial)

    def _write_settings(self, name: str, kind: Kind, folder: Path, d: dict[str, Any]) -> None:
        """The identity's broker settings beside its credentials, with paths as they are on
        this machine (edit them where the folder is copied to): `agent-mqtt.toml` for a
        device (the `[mqtt]` table of the agent's settings), `hub.env` for a hub."""
        b = d.get("broker", {})
        mode = b.get("mode", "mtls")
        f = folder.resolve()
        if kind == "device":
            lines = ["[mqtt]", f'port = {b.get("port", 8883)}', f'username = "{name}"']
            if mode == "password":
                lines.append(f'password_file = "{f / PASSWORD_FILE}"')
            lines += ["", "[mqtt.tls]", f'ca_file = "{f / "ca.crt"}"']
            if mode == "mtls":
                lines += [f'cert_file = "{f / "client.crt"}"', f'key_file = "{f / "client.key"}"']
            (folder / AGENT_MQTT_FILE).write_text("\n".join(lines) + "\n")
        else:
            env = {"EHI_HUB_MQTT__PORT": str(b.get("port", 8883)),
                   "EHI_HUB_MQTT__USERNAME": name, "EHI_HUB_REPLICA_ID": name,
                   "EHI_HUB_MQTT__SHARE_GROUP": d["share_group"],
                   "EHI_HUB_MQTT__TLS__CA_FILE": str(f / "ca.crt")}
            if mode == "password":
                env["EHI_HUB_MQTT__PASSWORD_FILE"] = str(f / PASSWORD_FILE)
            else:
                env["EHI_HUB_MQTT__TLS__CERT_FILE"] = str(f / "client.crt")
                env["EHI_HUB_MQTT__TLS__KEY_FILE"] = str(f / "client.key")
            _write_secret(folder / HUB_ENV_FILE, "".join(f"{k}={v}\n" for k, v in env.items()))

    def revoke(self, name: str, kind: Kind = "device") -> int:
        """Revoke an identity: its certificate goes on the CRL, its password and its access
        rules leave the broker's files. Returns the revoked serial."""
        d = self._load()
        rec = d[kind + "s"].get(name)
        if rec is None:
            raise IdentityError(f"no {kind} {name!r} is enrolled")
        if rec.get("revoked_at") is not None:
            raise IdentityError(f"{kind} {name!r} is already revoked")
        rec["revoked_at"] = time.time()
        d["revoked_serials"].append(rec["serial"])
        self._save(d)
        self.write_broker()
        return int(rec["serial"])

    # ------------------------------------------------------------------ the broker

    def write_broker(self, mode: BrokerMode | None = None, port: int | None = None,
                     host: str | None = None, run_as: str | None = None,
                     mount_dir: str | None = None, data_dir: str | None = None) -> Path:
        """(Re)write broker/: the CRL, the password file and the access rules of every active
        identity, and mosquitto.conf (mode, port and host are remembered from the last call).
        Returns broker/mosquitto.conf."""
        d = self._load()
        b = self.root / "broker"
        settings = d.setdefault("broker", {"mode": "mtls", "port": 8883, "host": "0.0.0.0",
                                           "run_as": None})
        for key, value in (("mode", mode), ("port", port), ("host", host), ("run_as", run_as),
                           ("mount_dir", mount_dir), ("data_dir", data_dir)):
            if value is not None:
                settings[key] = value
        self._save(d)
        self.ca.write_crl([int(s) for s in d["revoked_serials"]])
        (b / "crl.pem").write_bytes(self.ca.crl_path.read_bytes())
        (b / "ca.crt").write_bytes(self.ca.cert_path.read_bytes())
        active = self.identities(active_only=True)
        lines = [f"{n}:{r['password']}" for n, r in sorted(active.items())]
        _write_secret(b / "passwords", "\n".join(lines) + "\n")
        devices = sorted(n for n, r in active.items() if r["kind"] == "device")
        hubs = sorted(n for n, r in active.items() if r["kind"] == "hub")
        _write_secret(b / "acl", acl_text(devices, hubs))
        conf = b / "mosquitto.conf"
        conf.write_text(mosquitto_conf(b, settings["mode"], settings["port"], settings["host"],
                                       run_as=settings.get("run_as"),
                                       mount_dir=settings.get("mount_dir"),
                                       data_dir=settings.get("data_dir")))
        if mode is not None or port is not None:  # the identities' settings name both
            for n, r in active.items():
                self._write_settings(n, r["kind"], self.root / (r["kind"] + "s") / n, d)
        return conf

    def device_mqtt(self, device: str) -> dict[str, Any]:
        """The `[mqtt]` table written for a device (its agent-mqtt.toml), as a dict."""
        text = (self.root / "devices" / device / AGENT_MQTT_FILE).read_text()
        mqtt: dict[str, Any] = tomllib.loads(text)["mqtt"]
        return mqtt

    def hub_env(self, hub: str = DEFAULT_HUB) -> dict[str, str]:
        """The `EHI_HUB_*` variables written for a hub (its hub.env)."""
        lines = (self.root / "hubs" / hub / HUB_ENV_FILE).read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line)

    def rewrite_settings(self, name: str, kind: Kind) -> None:
        """Rewrite an identity's settings file (after the broker's mode or port changed)."""
        self._write_settings(name, kind, self.root / (kind + "s") / name, self._load())

    @property
    def share_group(self) -> str:
        return str(self._load()["share_group"])


def _write_secret(path: Path, text: str) -> None:
    """Replace a file readable by its owner only, atomically (the broker may read it now)."""
    write_secret(path, text.encode(), replace=True)


def reload_broker(pid_file: Path | None = None, pid: int | None = None) -> int:
    """Tell a running Mosquitto to re-read its password file, access rules and CRL (SIGHUP).
    Returns the pid signalled."""
    if pid is None:
        if pid_file is None:
            raise IdentityError("name the broker's pid or its pid file")
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise IdentityError(f"cannot read the broker's pid from {pid_file}: {exc}") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise IdentityError(f"cannot signal the broker (pid {pid}): {exc}") from None
    return pid
