"""Exceptions of the cloud hub.

    HubError
    ├── HubConfigError   settings that cannot work (bad database URL, missing bundle)
    └── StoreError       the database refused or failed an operation
"""


class HubError(Exception):
    """Root of the hub's errors."""


class HubConfigError(HubError):
    """The hub's settings cannot work; the message says what to change."""


class StoreError(HubError):
    """The database refused or failed an operation."""
