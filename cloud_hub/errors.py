"""Exceptions of the cloud hub.

    HubError
    ├── HubConfigError   settings that cannot work (bad database URL, missing bundle)
    ├── StoreError       the database refused or failed an operation
    └── RegistryError    a model registry or assignment request cannot be done (HTTP status)
        ├── BundleRejected   an uploaded bundle is malformed, hostile, unsigned or altered (422)
        ├── Invalid          a request's stages, selector or labels do not parse (422)
        ├── Conflict         the version exists, or a rollback lacks its directive (409)
        ├── NotFound         no such model, version, file or device (404)
        │   └── ArtifactNotFound  (artifacts.py) no such file in the artifact store
        ├── TooLarge         the upload exceeds the size limit (413)
        └── Unavailable      the hub cannot do it now (no MQTT bridge) (503)
"""


class HubError(Exception):
    """Root of the hub's errors."""


class HubConfigError(HubError):
    """The hub's settings cannot work; the message says what to change."""


class StoreError(HubError):
    """The database refused or failed an operation."""


class RegistryError(HubError):
    status = 400


class BundleRejected(RegistryError):
    status = 422


class Invalid(RegistryError):
    status = 422


class Conflict(RegistryError):
    status = 409


class NotFound(RegistryError):
    status = 404


class TooLarge(RegistryError):
    status = 413


class Unavailable(RegistryError):
    status = 503
