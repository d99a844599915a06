"""qtool: quantize LLMs with one registry of backends, then evaluate and compare them.

The public API (quantize, load, evaluate_perplexity, generate) is imported on first use, so that
`qtool --help` and the CLI's environment set-up run before torch or tqdm are imported.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "LoadedModel", "evaluate_divergence", "evaluate_perplexity", "evaluate_speed", "evaluate_word_perplexity",
    "generate", "load",
    "memory_footprint", "model_config", "quantize", "quantize_request",
)
__all__ = [*_API, "QtoolError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from qtool import api

        return getattr(api, name)
    if name == "QtoolError":
        from qtool.errors import QtoolError

        return QtoolError
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
