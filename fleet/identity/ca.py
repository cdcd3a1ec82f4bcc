"""The fleet's certificate authority: one EC P-256 key that issues the broker's server
certificate and a client certificate per device and per hub, and a revocation list.

Keys are written with mode 0600 and never overwritten; certificates name their identity in the
subject's common name, which the broker takes as the MQTT username (`use_identity_as_username`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from fleet.contract.errors import FleetError
from fleet.transport.tls import SecretFileError, check_private, write_secret

CA_KEY, CA_CERT, CRL = "ca.key", "ca.crt", "crl.pem"
Usage = Literal["client", "server"]


class IdentityError(FleetError):
    """The fleet's identities: a missing CA, an identity that exists, a key others can read."""


def _x509() -> Any:
    try:
        from cryptography import x509
    except ImportError:
        raise IdentityError("certificates need the 'cryptography' package: "
                            "pip install 'edge-hybrid-inference[fleet]'") from None
    return x509


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only; refuses to overwrite one."""
    try:
        write_secret(path, data)
    except FileExistsError:
        raise IdentityError(f"{path} exists; not overwriting a secret") from None


@dataclass(frozen=True, slots=True)
class Issued:
    name: str
    serial: int
    key: Path
    cert: Path
    not_after: datetime


class CertificateAuthority:
    """The CA in folder `root` (ca.key, ca.crt, crl.pem)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / CA_KEY).is_file() or not (root / CA_CERT).is_file():
            raise IdentityError(f"no fleet CA in {root}: run `fleet pki init`")

    @property
    def cert_path(self) -> Path:
        return self.root / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.root / CRL

    @classmethod
    def create(cls, root: Path, name: str = "edge-hybrid-inference fleet CA",
               days: int = 3650) -> CertificateAuthority:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        x509 = _x509()
        from cryptography.x509.oid import NameOID

        if (root / CA_KEY).exists():
            raise IdentityError(f"{root / CA_KEY} exists: the fleet already has a CA")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                             crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        root.mkdir(parents=True, exist_ok=True)
        write_private(root / CA_KEY, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (root / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(root)
        ca.write_crl([])
        return ca

    def _signer(self) -> tuple[Any, Any]:
        from cryptography.hazmat.primitives import serialization

        x509 = _x509()
        try:
            check_private(self.root / CA_KEY)
        except SecretFileError as exc:
            raise IdentityError(str(exc)) from None
        key = serialization.load_pem_private_key((self.root / CA_KEY).read_bytes(), None)
        return key, x509.load_pem_x509_certificate((self.root / CA_CERT).read_bytes())

    def issue(self, name: str, folder: Path, usage: Usage, hosts: tuple[str, ...] = (),
              days: int = 825) -> Issued:
        """A key and a certificate for `name` in `folder` (`{usage}.key`, `{usage}.crt`, and
        the CA's certificate beside them). Server certificates name `hosts` (DNS names or IP
        addresses) as subject alternative names."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        x509 = _x509()
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_key, ca_cert = self._signer()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
             .not_valid_before(now - timedelta(minutes=5)).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.SERVER_AUTH if usage == "server"
                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if usage == "server":
            sans: list[Any] = []
            for h in hosts or ("localhost", "127.0.0.1"):
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        folder.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = folder / f"{usage}.key", folder / f"{usage}.crt"
        write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / CA_CERT).write_bytes(self.cert_path.read_bytes())
        return Issued(name, serial, key_path, cert_path, not_after)

    def write_crl(self, serials: list[int], days: int = 3650) -> None:
        """The revocation list: every serial in `serials`, signed by the CA. Brokers read it
        with `crlfile`."""
        from cryptography.hazmat.primitives import hashes, serialization

        x509 = _x509()
        ca_key, ca_cert = self._signer()
        now = datetime.now(UTC)
        b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
             .last_update(now - timedelta(minutes=5)).next_update(now + timedelta(days=days)))
        for s in serials:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                          .revocation_date(now).build())
        crl = b.sign(ca_key, hashes.SHA256())
        tmp = self.crl_path.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.crl_path)
