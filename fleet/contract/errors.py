"""Exceptions shared by every deployable.

    FleetError
    ├── ProtocolError           a message that cannot be decoded or is not allowed
    │   └── UnsupportedVersion  a message from a protocol version this build does not speak
    ├── BundleError             a model bundle missing, malformed or unlike its manifest
    │   └── SignatureError      (signing.py) unsigned, unknown key, bad signature
    ├── SelectorError           (selectors.py) a label selector or label that does not parse
    └── TransportError          (fleet/transport/mqtt.py) no connection, publish refused
        HubClientError          (fleet/cli/hub_client.py) the hub refused or cannot be reached
"""


class FleetError(Exception):
    """Root of the fleet package's errors."""


class ProtocolError(FleetError):
    """A message that cannot be decoded, or whose content breaks the wire contract.

    `reason` names the kind of fault in a word (a metric label): "malformed", "version",
    "depth", "text", "number", "field", "too_large"."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class UnsupportedVersion(ProtocolError):
    """A message carrying a protocol version this build does not speak."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "version")


class BundleError(FleetError):
    """A model bundle that is missing, malformed or does not match its manifest."""
