"""Exceptions of the edge agent. (The inference engine's own, BackendError, InputError and
FidelityError among them, are in fleet/inference/errors.py.)

    AgentError
    ├── ConfigError    the settings file or environment is wrong
    ├── AgentBusy      the agent cannot take more work now (a full queue); retry later
    ├── OutboxFull     (outbox.py) the outbox is full under `reject_new`; the loss is counted
    └── UpdateError    a model update did not happen; `code` says why, the old model runs on
        ├── UpdateRefused  the assignment breaks a rule (signature, version, device, size)
        └── UpdateFailed   download, verification or health check failed
"""


class AgentError(Exception):
    """Root of the edge agent's errors."""


class ConfigError(AgentError):
    """The agent's settings are wrong; the message says which and how to fix it."""


class AgentBusy(AgentError):
    """The agent cannot take more work now (a full queue); retry later."""


class UpdateError(AgentError):
    """A model update did not happen; the agent stays on (or returns to) its previous model."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class UpdateRefused(UpdateError):
    """The assignment breaks a rule: unsigned, unknown key, altered, expired, not newer,
    incompatible, too large, replayed. Retrying the same assignment cannot succeed."""


class UpdateFailed(UpdateError):
    """Download, verification or the health check failed."""
