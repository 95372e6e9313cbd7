"""Errors a user can cause; each message names the fix."""


class TllabError(Exception):
    """Base class of errors caused by configuration, data or checkpoints."""


class ConfigError(TllabError, ValueError):
    """The composed configuration is invalid."""


class RunDirRefused(ConfigError):
    """The run dir holds another run (another config), or a run whose config cannot be read."""


class CheckpointError(TllabError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class NonFiniteLossError(TllabError, FloatingPointError):
    """The training loss became NaN or infinite."""


class DataError(TllabError):
    """Data on disk is missing, unreadable or inconsistent with the config.

    Raised inside a DataLoader worker, it reaches the main process as ``DataError("Caught DataError
    in DataLoader worker process 0. Original Traceback ...")``; the message is cut back to the
    original one line, so the user sees the file and the fix, not a traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
