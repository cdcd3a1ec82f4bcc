"""Exceptions of the edge agent.

    AgentError
    ├── ConfigError    the settings file or environment is wrong
    ├── BackendError   the inference runtime is missing or failed to load or run a model
    ├── InputError     an input submitted to the agent is not what the bundle accepts
    └── AgentBusy      the agent cannot take more work now (a full queue); retry later
"""


class AgentError(Exception):
    """Root of the edge agent's errors."""


class ConfigError(AgentError):
    """The agent's settings are wrong; the message says which and how to fix it."""


class BackendError(AgentError):
    """The inference runtime is missing, or failed to load or run the model."""


class InputError(AgentError):
    """An input the bundle does not accept (shape, dtype, encoding)."""


class AgentBusy(AgentError):
    """The agent cannot take more work now (a full queue); retry later."""
