"""Folders shipped with qtool: at the top of a source checkout, inside the package once installed."""

from __future__ import annotations

from pathlib import Path

from qtool.errors import QtoolError


def bundled_dir(name: str) -> Path:
    """`name` (e.g. "recipes") from a checkout, or its copy `qtool/_name` in an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / f"_{name}", package.parent / name):
        if candidate.is_dir():
            return candidate
    raise QtoolError(f"qtool's bundled {name}/ folder is missing from this installation; reinstall qtool")
