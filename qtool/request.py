"""One quantize request: method, bits, group size, options, calibration, seed and device.

Every way of asking for a quantization builds this one typed object: `qtool quantize`'s flags,
a quantize recipe, a compare cell, qlora's `quantization:` section and merge's re-quantization.
Its fields are typed by pydantic (qtool.schema.Section: unknown keys and wrong types are one-line
errors); the backend's own rules (bits it supports, group sizes, options, calibration ranges)
are checked once, when the request is built, by `Backend.make_spec`, whose SpecError passes
through unchanged. `spec` is the checked QuantSpec.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, PrivateAttr, model_validator

from qtool.calibration import CalibrationFields, CalibrationSpec
from qtool.errors import SpecError
from qtool.mixed.target import MixedTarget, parse_size
from qtool.runtime import check_device_name
from qtool.schema import Seed, parse_section

OptionValue = bool | int | float | str
Device = Literal["auto", "cpu", "cuda"]


def option_strings(options: dict[str, Any] | None) -> dict[str, str]:
    """Options as the KEY=VALUE strings backends parse, as from the command line (YAML booleans
    become true/false)."""
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (options or {}).items()}


class QuantizeFields(CalibrationFields):
    """The typed keys of a quantize request before they meet a backend: what a quantize recipe or
    qlora's `quantization:` section holds until flags and defaults are merged in."""

    method: str | None = Field(None, min_length=1)
    bits: PositiveInt | None = None  # None: the backend's default
    group_size: int | None = None  # None: the backend's default; -1: per output channel (checked by the backend)
    options: dict[str, OptionValue] = Field(default_factory=dict)
    seed: Seed | None = None
    device: Device | None = None
    # mixed precision (qtool.mixed): one budget, the plan picks each layer's bits
    target_bits: float | None = Field(None, gt=0, allow_inf_nan=False)  # average bits per quantized weight, scales included
    target_size: str | PositiveInt | None = None  # bytes of the written weights: 120MiB, 0.5GB, 125829120
    sensitivity: Literal["fisher", "output", "kl"] | None = None  # the per-layer cost measure (default: the backend's)
    perturbation: Literal["rtn", "method"] | None = None  # the error it perturbs weights by (default: the backend's)
    mixed_bits: list[PositiveInt] | None = None  # the widths a plan may give a layer (default: the backend's)

    def request(self, **defaults: Any) -> QuantizeRequest:
        """The checked request: these keys, with `defaults` for the ones left out (None)."""
        given = {k: v for k, v in self.model_dump().items() if v is not None and k in QuantizeRequest.model_fields}
        merged = {**{k: v for k, v in defaults.items() if v is not None}, **given}
        return parse_section(QuantizeRequest, merged, "quantization", error=SpecError)


class QuantizeRequest(QuantizeFields):
    """What to quantize with, checked against the backend when built.

    Raises pydantic's ValidationError for wrong types (qtool.schema.parse_section turns it into
    one line) and qtool.errors.SpecError / UnknownMethodError for what the backend refuses.
    """

    method: str = Field(min_length=1)
    seed: Seed = 0
    device: str = "auto"  # auto, cpu or cuda (qtool.runtime.check_device_name, the message resolve_device gives)
    _spec: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _checked_by_the_backend(self) -> QuantizeRequest:
        from qtool import backends

        check_device_name(self.device)
        backend = backends.get(self.method)
        self._spec = backend.make_spec(self.bits, self.group_size, option_strings(self.options), self.seed,
                                       self.calibration_spec(), self.mixed_target())
        return self

    def mixed_target(self) -> MixedTarget | None:
        """The mixed-precision budget the request names; None for one bit-width everywhere."""
        if self.target_bits is None and self.target_size is None:
            if self.sensitivity is not None or self.perturbation is not None or self.mixed_bits is not None:
                raise SpecError("--sensitivity, --perturbation and --mixed-bits only apply with --target-bits or "
                                "--target-size")
            return None
        size = None if self.target_size is None else parse_size(self.target_size)
        return MixedTarget(self.target_bits, size, self.sensitivity, self.perturbation,
                           tuple(self.mixed_bits) if self.mixed_bits is not None else None)

    def calibration_spec(self) -> CalibrationSpec | None:
        """The calibration the request names; None when it names none (the backend's default)."""
        return CalibrationSpec.from_arguments(self.calib, self.nsamples, self.seqlen, self.bos)

    @property
    def spec(self) -> Any:
        """The backend's checked QuantSpec (qtool.backends.base.QuantSpec)."""
        return self._spec
