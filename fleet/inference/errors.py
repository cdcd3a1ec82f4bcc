"""Exceptions of the inference package (what the agent and the hub both run).

    InferenceError
    ├── BackendError        the runtime is missing, or failed to load or run the model
    │   └── FidelityError   no backend runs the bundle as faithfully as the bundle promises
    ├── InputError          an input the bundle does not accept (shape, dtype, values)
    └── HealthCheckFailed   the bundle's golden input or latency budget failed on this backend
"""


class InferenceError(Exception):
    """Root of the inference package's errors."""


class BackendError(InferenceError):
    """The inference runtime is missing, or failed to load or run the model."""


class FidelityError(BackendError):
    """No backend runs the bundle faithfully on this device; `reasons` says why, per backend."""

    code = "fidelity"

    def __init__(self, message: str, reasons: dict[str, str]) -> None:
        super().__init__(message)
        self.reasons = reasons


class InputError(InferenceError):
    """An input the bundle does not accept (shape, dtype, encoding)."""


class HealthCheckFailed(InferenceError):
    """The bundle failed its health check on this backend (golden output, latency)."""
