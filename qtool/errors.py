"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class QtoolError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in qtool."""

    exit_code = 1


class UnknownMethodError(QtoolError):
    pass


class SpecError(QtoolError):
    """Bits, group size or an option the chosen backend cannot do."""


class BackendUnavailableError(QtoolError):
    """The backend's package is missing, it needs a device that is not here, or it is not built yet."""


class ModelNotFoundError(QtoolError):
    pass


class CheckpointError(QtoolError):
    """A model folder that is corrupt, truncated or not a model at all."""


class DatasetError(QtoolError):
    pass


class OutputExistsError(QtoolError):
    pass


class DeviceError(QtoolError):
    pass
