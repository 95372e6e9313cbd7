"""Errors a user can cause; each message names the fix."""


class TllabError(Exception):
    """Base class of errors caused by configuration, data or checkpoints."""


class ConfigError(TllabError, ValueError):
    """The composed configuration is invalid."""


class CheckpointError(TllabError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class NonFiniteLossError(TllabError, FloatingPointError):
    """The training loss became NaN or infinite."""
