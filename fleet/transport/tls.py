"""TLS to the broker: the CA that signs the broker's certificate, and optionally the client's own
certificate and key (mutual TLS). The broker's certificate must name the host connected to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import model_validator

from fleet.contract.errors import FleetError
from fleet.transport.strict_settings import Section


class SecretFileError(FleetError):
    """A secret file that cannot be read, or that others may read."""


def check_private(path: Path) -> None:
    """Refuse a secret that others may read (as ssh does): no permission for other users, and
    none for its group either unless that group is this process's own (a Kubernetes Secret
    mounted with `fsGroup` is group-readable by the pod's group, mode 0440)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc}") from None
    mode = st.st_mode
    ours = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if mode & 0o007 or (mode & 0o070 and not (ours and not mode & 0o030)):
        raise SecretFileError(f"{path} is readable by others (mode {mode & 0o777:o}): "
                              f"chmod 600 {path}")


def write_secret(path: Path, data: bytes, replace: bool = False) -> None:
    """Write a secret readable by its owner only (mode 0600). Without `replace` an existing file
    is never overwritten (FileExistsError); with it, the file is replaced atomically (a reader,
    the broker say, sees the old or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".tmp") if replace else path
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    if replace:
        target.replace(path)


def read_secret(path: Path) -> str:
    """The first line of a secret file (a password or a token), checked like a key."""
    check_private(path)
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"cannot read {path}: {exc}") from None


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class TlsSettings(Section):
    """`[mqtt.tls]` of the agent's settings, `EHI_HUB_MQTT__TLS__*` of the hub's."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS) or not at all")
        return self

    def config(self) -> TlsConfig:
        """Checked: the files exist and the key is readable by its owner only."""
        for f in (self.ca_file, self.cert_file):
            if f is not None and not f.is_file():
                raise SecretFileError(f"TLS file {f} does not exist")
        if self.key_file is not None:
            check_private(self.key_file)
        return TlsConfig(self.ca_file, self.cert_file, self.key_file)
