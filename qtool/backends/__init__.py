"""The registry of quantizer backends.

A backend is one module in this package whose class is decorated with @register; every module
here except base.py and private helpers (_*.py) is imported on first use, so adding a backend
touches one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from qtool.backends.base import Backend, Capabilities, QuantSpec
from qtool.errors import UnknownMethodError

_REGISTRY: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"backend {cls.name} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def known_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    """The backend called `name`, or a one-line error saying why there is none."""
    _load_all()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")


@dataclass(frozen=True)
class MethodStatus:
    name: str
    ready: bool
    reason: str  # empty when ready
    summary: str
    capabilities: Capabilities


def available(device: str = "cpu") -> list[MethodStatus]:
    """Every known method with 'ready' or the exact reason it is not."""
    _load_all()
    rows = []
    for name in known_methods():
        backend = _REGISTRY[name]
        reason = backend.unavailable_reason(device)
        rows.append(MethodStatus(name, reason is None, reason or "", backend.summary, backend.capabilities))
    return rows


__all__ = ["Backend", "Capabilities", "QuantSpec", "MethodStatus", "available", "get", "known_methods", "register"]
