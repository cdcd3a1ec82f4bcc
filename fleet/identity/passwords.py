"""Mosquitto password files: PBKDF2-SHA512 hashes in the format `mosquitto_passwd` writes
(`user:$7$iterations$salt$hash`, base64), so the project needs no Mosquitto tools to make one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# mosquitto_passwd's own choices (Mosquitto 2.0): PBKDF2-SHA512, 101 iterations, 12-byte salt.
# The count is low because the secrets hashed are random 32-byte tokens, not human passwords:
# they cannot be guessed, however fast the hash.
ITERATIONS = 101
SALT_BYTES = 12


def new_password() -> str:
    """A random password for a device: 256 bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def mosquitto_hash(password: str, salt: bytes | None = None,
                   iterations: int = ITERATIONS) -> str:
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check(password: str, hashed: str) -> bool:
    """Does `password` match a `$7$` hash (for tests and `fleet devices show`)?"""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        want = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                  int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(want, got)
