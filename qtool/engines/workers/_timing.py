"""Timing helpers shared by the worker scripts (standard library only: they run in engine venvs)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def speed_entry(batch: int, prompt_tokens: int, new_tokens: int, first: list[float], total: list[float]) -> dict[str, Any]:
    """One batch size's numbers from paired runs: `first` = seconds to the first new token
    (prefill), `total` = seconds to all new_tokens. Decode tok/s = batch * (new_tokens - 1) /
    (total - first), prefill tok/s = batch * prompt_tokens / first."""
    decode = [batch * (new_tokens - 1) / max(t - f, 1e-9) for f, t in zip(first, total, strict=True)]
    return {
        "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": len(first),
        "prefill_tokens_per_s": spread([batch * prompt_tokens / f for f in first]),
        "time_to_first_token_s": spread(first),
        "decode_tokens_per_s": spread(decode),
    }
