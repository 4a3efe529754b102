"""The small set of errors a radflow user can meet; each message names the file, key or id and the next step."""


class RadflowError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(RadflowError):
    """params.yaml or the environment is wrong."""


class DataError(RadflowError):
    """Input data is missing, unreadable or fails validation."""


class ValidationFailed(DataError):
    """A critical data expectation failed; training must not start."""


class WorkspaceError(RadflowError):
    """The workspace is not a radflow checkout (git + DVC) or is in an unexpected state."""


class TrackingError(RadflowError):
    """MLflow could not be reached or refused an operation."""
