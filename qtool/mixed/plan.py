"""A mixed-precision plan: the budget, the layer groups, their costs and the chosen bit-widths.

`check_budget` runs before any weight is loaded (it needs the layer shapes only); `make_plan`
loads the full-precision model, measures (or reads from qtool's cache) the costs and solves the
allocation. `MixedPlan.apply` turns a QuantSpec into one with per-module bits, which the
backends quantize; `MixedPlan.record` is what qtool.json's `mixed_precision` holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qtool.errors import SpecError
from qtool.mixed.allocate import allocate
from qtool.mixed.perturbation import perturbation_errors
from qtool.mixed.sensitivity import TOKEN_BUDGET, budget_samples, measure
from qtool.mixed.target import MixedTarget, size_words
from qtool.mixed.units import Unit, decision_units

SENSITIVITY_VERSION = 1  # bump when the measures change: cached costs are keyed by it


@dataclass
class Budget:
    """Sizes of every (group, candidate) in bits (for --target-bits) and bytes (for --target-size)."""

    units: list[Unit]
    candidates: tuple[int, ...]
    bits: np.ndarray  # (groups, candidates): storage bits of the group's weights, scales included
    bytes: np.ndarray  # (groups, candidates): bytes the backend writes for the group's layers
    fixed_bytes: int  # unquantized tensors (embeddings, norms, output head)

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)

    def limit(self, target: MixedTarget) -> tuple[np.ndarray, float]:
        """(sizes, budget) in the target's unit."""
        if target.bits is not None:
            return self.bits, target.bits * self.numel
        return self.bytes, float(target.size_bytes - self.fixed_bytes)

    def describe_range(self, target: MixedTarget) -> str:
        """'4.312 to 8.250 bits/weight' (or sizes): the smallest and the largest plan (one value when they agree)."""
        if target.bits is not None:
            low, high = self.bits.min(1).sum() / self.numel, self.bits.max(1).sum() / self.numel
            words = [f"{low:.3f}", f"{high:.3f} bits/weight"]
        else:
            low, high = self.fixed_bytes + self.bytes.min(1).sum(), self.fixed_bytes + self.bytes.max(1).sum()
            words = [size_words(low), size_words(high)]
        return words[1] if low == high else " to ".join(words)

    def least(self, target: MixedTarget) -> str:
        """The smallest budget of the target's kind that a plan meets, rounded up so that asking
        for it succeeds: '4.625 bits/weight' or '150.24 MiB'."""
        if target.bits is not None:
            return f"{math.ceil(self.bits.min(1).sum() / self.numel * 1000) / 1000:.3f} bits/weight"
        return f"{math.ceil((self.fixed_bytes + self.bytes.min(1).sum()) / 2**20 * 100) / 100:.2f} MiB"


#: bytes a tensor adds to a safetensors header (its name, dtype, shape and offsets as JSON);
#: measured 105 per tensor on qtool's gptq and hqq checkpoints, rounded up
HEADER_BYTES_PER_TENSOR = 112


def budget_table(backend: Any, spec: Any, linears: dict[str, nn.Linear], params: tuple[int, int],
                 dtype_bytes: int) -> Budget:
    """The sizes of every candidate of every group, from the layer shapes alone.

    params: (parameters, parameter tensors) of the whole model (qtool.models.parameter_count).
    Bytes count each layer's tensors in the backend's layout plus their safetensors header entries.
    """
    total_params, total_tensors = params
    units = decision_units(linears)
    candidates = backend.mixed_widths(spec.target)
    specs = [dataclasses.replace(spec, bits=b) for b in candidates]
    bits = np.array([[u.numel * backend.effective_bits(s) for s in specs] for u in units])
    per_layer_header = backend.stored_tensors_per_layer * HEADER_BYTES_PER_TENSOR
    sizes = np.array([[sum(backend.layer_bytes(s, o, i) + per_layer_header for o, i in u.shapes) for s in specs]
                      for u in units], dtype=float)
    fixed = ((total_params - sum(u.numel for u in units)) * dtype_bytes
             + (total_tensors - len(linears)) * HEADER_BYTES_PER_TENSOR)
    return Budget(units, candidates, bits, sizes, fixed)


def check_budget(budget: Budget, target: MixedTarget, method: str) -> None:
    """Refuse, before any weight is loaded, a budget no plan meets. Raises SpecError.

    A budget above the largest plan is met by it (every layer at the top width).
    """
    sizes, limit = budget.limit(target)
    if sizes.min(1).sum() > limit * (1 + 1e-9):
        low, high = min(budget.candidates), max(budget.candidates)
        plans = (f"its only plan is {budget.describe_range(target)} (every layer at {low} bits)" if low == high else
                 f"its plans span {budget.describe_range(target)} (every layer at {low} to {high} bits)")
        raise SpecError(f"{method} cannot meet {target.describe()}: {plans}; ask for at least {budget.least(target)}")


@dataclass
class MixedPlan:
    """The outcome: for each group the chosen candidate, with what it costs and weighs."""

    target: MixedTarget
    budget: Budget
    group_size: int
    costs: np.ndarray  # (groups, candidates), nats per token (see qtool.mixed.sensitivity)
    choice: np.ndarray  # (groups,) candidate index
    measured: dict[str, Any]  # how the costs were obtained (proxy, tokens, seconds, cached)

    @property
    def unit_bits(self) -> list[int]:
        return [self.budget.candidates[c] for c in self.choice]

    @property
    def layer_bits(self) -> dict[str, int]:
        return {name: bits for unit, bits in zip(self.budget.units, self.unit_bits, strict=True) for name in unit.modules}

    @property
    def base_bits(self) -> int:
        """The most common width (by layers): the checkpoint's default, the rest are overrides."""
        return Counter(self.layer_bits.values()).most_common(1)[0][0]

    def _chosen(self, table: np.ndarray) -> float:
        return float(table[np.arange(len(self.choice)), self.choice].sum())

    @property
    def average_bits(self) -> float:
        return self._chosen(self.budget.bits) / self.budget.numel

    @property
    def predicted_bytes(self) -> int:
        return int(self.budget.fixed_bytes + self._chosen(self.budget.bytes))

    @property
    def predicted_cost(self) -> float:
        return self._chosen(self.costs)

    def apply(self, spec: Any) -> Any:
        """`spec` with the plan's per-module bits (QuantSpec.layer_bits) and its base width."""
        return dataclasses.replace(spec, bits=self.base_bits, layer_bits=self.layer_bits)

    def record(self) -> dict[str, Any]:
        widths = Counter(self.layer_bits.values())
        return {
            "target": self.target.as_dict(),
            "candidates": list(self.budget.candidates),
            "group_size": self.group_size,
            "average_bits": round(self.average_bits, 4),
            "predicted_bytes": self.predicted_bytes,
            "layers_per_bits": {str(b): widths[b] for b in sorted(widths)},
            # the increase of the mean token loss (nats) the costs predict for this plan, assuming the
            # groups' costs add up; exp(it) is the predicted perplexity ratio. A ranking device: with
            # round-to-nearest errors it overstates what gptq/awq lose (sensitivity.perturbation)
            "predicted_loss_increase": round(self.predicted_cost, 6),
            "predicted_ppl_ratio": round(float(np.exp(self.predicted_cost)), 4),
            "sensitivity": self.measured,
            "groups": [
                {"group": u.name, "modules": list(u.modules), "bits": b, "numel": u.numel,
                 "cost": {str(c): round(float(v), 8) for c, v in zip(self.budget.candidates, row, strict=True)}}
                for u, b, row in zip(self.budget.units, self.unit_bits, self.costs, strict=True)
            ],
        }

    def summary_lines(self) -> list[str]:
        widths = Counter(self.unit_bits)
        mix = ", ".join(f"{widths[b]} group{'s' if widths[b] != 1 else ''} at {b} bits" for b in sorted(widths))
        return [
            f"plan for {self.target.describe()} ({self.measured['proxy']} sensitivity, "
            f"{self.target.perturbation} errors, {self.measured['tokens']} calibration tokens"
            f"{', cached' if self.measured.get('cached') else ''}):",
            f"  {mix}",
            f"  average {self.average_bits:.3f} bits/weight, predicted weights {self.predicted_bytes / 2**20:.2f} MiB, "
            f"predicted PPL x{np.exp(self.predicted_cost):.3f} of the base (the costs summed)",
        ]


def make_plan(source: Any, backend: Any, spec: Any, budget: Budget, calibration: Any, device: str,
              dtype: Any) -> MixedPlan:
    """Measure the costs (or read them from the cache) and solve the allocation for `spec.target`.

    The costs are measured on the model the backend will quantize (Backend.sensitivity_model:
    e.g. gptq's rotated one with rotate=true).
    """
    target, group_size = spec.target, spec.group_size
    used = budget_samples(calibration.samples, TOKEN_BUDGET[target.sensitivity])
    tokens = sum(len(s) for s in used)
    transform = backend.sensitivity_transform(spec)
    perturbation = ({"perturbation": "method", "method": spec.method, "options": dataclasses.asdict(spec.options),
                     "seed": spec.seed} if target.perturbation == "method" else {})
    key = _cache_key(source, budget, target.sensitivity, group_size, calibration.record, tokens, transform,
                     perturbation)
    path = _cache_path(key)
    start = time.perf_counter()
    cached, seconds = _read_cache(path, budget)
    if cached is None:
        errors = perturbation_errors(target.perturbation, source, backend, spec, budget.candidates, calibration,
                                     device)
        model = source.load_model(device, dtype)
        backend.sensitivity_model(model, spec)
        costs = np.array(measure(model, budget.units, budget.candidates, errors, used, target.sensitivity))
        del model
        seconds = round(time.perf_counter() - start, 1)
        _write_cache(path, budget, costs, seconds)
    else:
        costs = cached
    # seconds: what measuring took, also when this run read the costs from the cache
    measured = {"proxy": target.sensitivity, "tokens": tokens, "samples": len(used),
                "seconds": seconds, "cached": cached is not None,
                "perturbation": (f"{spec.method} itself, one uniform quantization per width"
                                 if target.perturbation == "method"
                                 else f"round-to-nearest, min-max grid with zero point, group {group_size}"),
                **({"model": transform} if transform else {}),
                "cache": str(path)}
    sizes, limit = budget.limit(target)
    choice = allocate(costs, sizes, limit)
    return MixedPlan(target, budget, group_size, costs, choice, measured)


def _cache_key(source: Any, budget: Budget, proxy: str, group_size: int, calibration: dict[str, Any],
               tokens: int, transform: str, perturbation: dict[str, Any]) -> str:
    location = Path(source.location)
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in location.glob("*.safetensors")) \
        if location.is_dir() else []
    payload = {"version": SENSITIVITY_VERSION, "source": source.location, "weights": weights, "proxy": proxy,
               "group_size": group_size, "candidates": budget.candidates, "tokens": tokens,
               "calibration": calibration,
               "units": [u.name for u in budget.units], "transform": transform, **perturbation}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cache_path(key: str) -> Path:
    from qtool.models import cache_dir

    return cache_dir() / "sensitivity" / f"{key}.json"


def _read_cache(path: Path, budget: Budget) -> tuple[np.ndarray | None, float | None]:
    """(costs, seconds they took to measure), or (None, None) when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
        costs = np.array(data["costs"], dtype=float)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    if costs.shape != (len(budget.units), len(budget.candidates)):
        return None, None
    return costs, data.get("seconds")


def _write_cache(path: Path, budget: Budget, costs: np.ndarray, seconds: float) -> None:
    from qtool.checkpoint import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"units": [u.name for u in budget.units],
                                            "candidates": list(budget.candidates), "costs": costs.tolist(),
                                            "seconds": seconds}))
    except OSError:  # a read-only cache costs the next run a re-measurement, not this run
        if os.environ.get("QTOOL_DEBUG"):
            raise
