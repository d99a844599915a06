"""Registry of serving engines: hf (transformers, the reference), vllm, llamacpp.

`get(name)` returns the engine or raises EngineError naming the known ones; `statuses()` says for
each whether it can run here and, if not, how to set it up. Adding an engine: a subclass of
qtool.engines.base.Engine (or ExternalEngine with a worker script) and one line here.
"""

from __future__ import annotations

from qtool.engines.base import Engine, EngineFailure, EngineJob, EngineRun
from qtool.engines.hf import HfEngine
from qtool.engines.llamacpp import LlamaCppEngine
from qtool.engines.vllm import VllmEngine
from qtool.errors import EngineError

ENGINES: dict[str, type[Engine]] = {"hf": HfEngine, "vllm": VllmEngine, "llamacpp": LlamaCppEngine}
ENGINE_NAMES = tuple(ENGINES)

__all__ = ["ENGINES", "ENGINE_NAMES", "Engine", "EngineFailure", "EngineJob", "EngineRun", "get", "statuses"]


def get(name: str) -> Engine:
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    return ENGINES[name]()


def statuses() -> dict[str, str | None]:
    """engine name -> None when it can run here, else why not and the fix."""
    return {name: cls().unavailable() for name, cls in ENGINES.items()}
