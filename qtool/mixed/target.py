"""The budget a mixed-precision request states: average bits per weight, or a size in bytes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from qtool.errors import SpecError

PROXIES = ("fisher", "output", "kl")
PERTURBATIONS = ("rtn", "method")
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class MixedTarget:
    """What `--target-bits` / `--target-size` ask for; exactly one of `bits` and `size_bytes` is set.

    bits: average storage bits per quantized weight (scales and zero points included);
    size_bytes: bytes of the written weights (quantized layers plus unquantized tensors);
    sensitivity: the per-layer cost measure (qtool.mixed.sensitivity: "fisher" or "kl");
    perturbation: the error it perturbs weights by (qtool.mixed.perturbation: "rtn" or "method");
    candidates: the widths a layer group may take (None: all the backend offers), e.g. (4, 8) for
    the GPTQ widths vLLM runs.
    """

    bits: float | None = None
    size_bytes: int | None = None
    sensitivity: str | None = None  # None: the backend's default (Backend.mixed_defaults)
    perturbation: str | None = None
    candidates: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.size_bytes is None):
            raise SpecError("give one budget: --target-bits or --target-size, not both")
        if self.bits is not None and not self.bits > 0:
            raise SpecError(f"--target-bits must be positive, got {self.bits}")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise SpecError(f"--target-size must be positive, got {self.size_bytes} bytes")
        if self.sensitivity is not None and self.sensitivity not in PROXIES:
            raise SpecError(f"--sensitivity takes one of {', '.join(PROXIES)}, got {self.sensitivity!r}")
        if self.perturbation is not None and self.perturbation not in PERTURBATIONS:
            raise SpecError(f"--perturbation takes one of {', '.join(PERTURBATIONS)}, got {self.perturbation!r}")

    def resolved(self, defaults: tuple[str, str]) -> MixedTarget:
        """This target with the backend's (sensitivity, perturbation) where it names none."""
        return replace(self, sensitivity=self.sensitivity or defaults[0], perturbation=self.perturbation or defaults[1])

    def widths(self, offered: tuple[int, ...], method: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """The candidate widths: `candidates` checked against what the backend offers, or without
        candidates the backend's `default`. Raises SpecError for a width it does not offer."""
        if self.candidates is None:
            return default
        bad = sorted(set(self.candidates) - set(offered))
        if bad or not self.candidates:
            raise SpecError(f"--mixed-bits {','.join(map(str, self.candidates))}: {method} gives a layer one of "
                            f"{','.join(map(str, offered))} bits")
        return tuple(sorted(set(self.candidates)))

    def describe(self) -> str:
        return f"{self.bits:g} bits/weight" if self.bits is not None else size_words(self.size_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}


def size_words(size: float) -> str:
    """'123.45 MiB', or plain bytes below 0.01 MiB (where two decimals of MiB would read 0.00)."""
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 / 100 else f"{size:,.0f} bytes"


def parse_size(text: str | int) -> int:
    """Bytes from '120MiB', '0.5 GB', '123456' (plain bytes). Raises SpecError for anything else."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in UNITS | {"": 1}:
        raise SpecError(f"--target-size takes a size such as 120MiB, 0.5GB or 125829120 (bytes), got {text!r}")
    return int(float(match.group(1)) * UNITS.get(unit, 1))
