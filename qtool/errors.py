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


class EngineError(QtoolError):
    """A serving engine that is not set up, or that failed to load or run a checkpoint."""


def describe_library_error(exc: BaseException) -> str | None:
    """One line for the errors that libraries raise at qtool's boundaries, or None when unknown.

    Disk full, read-only or permission-denied writes (OSError, and safetensors' SafetensorError,
    which carries the OS message in its text), running out of memory (host or CUDA).
    """
    import errno

    if isinstance(exc, OSError) and exc.errno is not None:
        where = f": {exc.filename}" if exc.filename else ""
        reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
        return f"{reason}{where}"
    if type(exc).__name__ == "SafetensorError":
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "SafetensorError"
        if "No space left" in text:
            return f"no space left on the device while writing weights ({text})"
        return f"safetensors: {text}"
    if isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc):
        # torch's CPU allocator raises a RuntimeError, not MemoryError, when malloc fails (ulimit, cgroup)
        return "out of memory (host RAM): use a smaller model, batch or window, or a machine with more memory"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"out of GPU memory: {first[:200]}"
    return None
