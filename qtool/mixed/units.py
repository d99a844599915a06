"""The layer groups a plan gives one bit-width each.

Serving engines fuse the projections that read the same input into one matrix: vLLM's
QKVParallelLinear (q/k/v) and MergedColumnParallelLinear (gate/up) need one quantization config
for the fused weight, and refuse a checkpoint whose shards differ. A plan therefore decides per
group, never per shard: every other Linear is a group of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass(frozen=True)
class Unit:
    """One decision of a plan: `modules` (full names) share a bit-width; `shapes` are their
    (out_features, in_features)."""

    name: str
    modules: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.shapes)


def decision_units(linears: dict[str, nn.Linear]) -> list[Unit]:
    """Group `linears` (name -> Linear, in model order) into fused groups and single layers."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        fused = next((f for f in FUSED if leaf in f and all(f"{parent}.{s}" in linears for s in f)), None)
        key = f"{parent}.{'+'.join(fused)}" if fused else name
        groups.setdefault(key, []).append(name)
    return [Unit(key, tuple(names), tuple((linears[n].out_features, linears[n].in_features) for n in names))
            for key, names in groups.items()]
