"""QuantSpec, Capabilities and the Backend interface every quantizer implements."""

from __future__ import annotations

import dataclasses
import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from qtool.calibration import CalibrationSet, CalibrationSpec
from qtool.errors import BackendUnavailableError, SpecError
from qtool.mixed.target import MixedTarget
from qtool.models import ModelSource
from qtool.runtime import compute_dtype


@dataclass(frozen=True)
class Capabilities:
    bits: tuple[int, ...]
    needs_calibration: bool
    devices: tuple[str, ...]
    serializable: bool
    peft_trainable: bool
    # import name -> pip extra that provides it
    packages: dict[str, str] = field(default_factory=dict)
    # None: any group size dividing the layer width (or -1, per channel); else the only ones allowed
    group_sizes: tuple[int, ...] | None = None
    format: str = ""  # what OUT contains and who can load it


@dataclass(frozen=True)
class QuantSpec:
    """What to do, validated before any weight is loaded."""

    method: str
    bits: int
    group_size: int  # -1: one group per output channel
    options: Any  # the backend's own Options dataclass instance
    seed: int = 0
    calibration: CalibrationSpec | None = None  # for the methods that quantize from data
    # mixed precision (qtool.mixed): the budget asked for, then the plan's per-module bits
    # (full module name -> bits; modules not named take `bits`)
    target: MixedTarget | None = None
    layer_bits: dict[str, int] | None = None

    def bits_of(self, module: str) -> int:
        """The bit-width of the module named `module` (full name)."""
        return (self.layer_bits or {}).get(module, self.bits)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "options": dataclasses.asdict(self.options),
            "seed": self.seed,
            **({"calibration": dataclasses.asdict(self.calibration)} if self.calibration else {}),
            **({"target": self.target.as_dict()} if self.target else {}),
        }


@dataclass
class NoOptions:
    pass


@dataclass
class Quantized:
    """What `Backend.quantize` returns: the quantized model and what qtool.json records about the run.

    `losses`: per-module reconstruction losses ({"module", "loss", ...} rows) for `layer_losses`;
    `record`: extra top-level qtool.json keys (e.g. gptq's `rotation`).
    """

    model: nn.Module
    losses: list[dict[str, Any]] | None = None
    record: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """One quantization method. Subclasses live one per file and register with @register."""

    name: ClassVar[str]
    summary: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type] = NoOptions
    default_bits: ClassVar[int] = 4
    default_group_size: ClassVar[int] = 64
    # methods that calibrate only with some options (w8a8's smoothquant=true, fp8's activations=static):
    # those options, as KEY=VALUE, for messages and `qtool methods`; calibrates() decides
    calibrating_options: ClassVar[tuple[str, ...]] = ()
    # mixed precision (qtool.mixed): the bit-widths a plan may give a layer; () = no per-layer bits
    mixed_bits: ClassVar[tuple[int, ...]] = ()
    # the widths a plan uses when --mixed-bits names none (None: all of mixed_bits)
    mixed_default_bits: ClassVar[tuple[int, ...] | None] = None
    # False where the written size does not depend on the bits (rtn stores dense weights)
    mixed_size_target: ClassVar[bool] = True
    # tensors one quantized layer writes (for the safetensors header a size budget counts)
    stored_tensors_per_layer: ClassVar[int] = 1
    # the (sensitivity, perturbation) a plan uses unless told otherwise (qtool.mixed)
    mixed_defaults: ClassVar[tuple[str, str]] = ("fisher", "rtn")
    resumable: ClassVar[bool] = False  # quantize() takes a `workdir` that survives Ctrl-C (see api.resume_folder)
    # quantize_layer() quantizes each Linear alone, without calibration: qtool.streaming can then
    # read the source one tensor at a time instead of loading the model
    streams: ClassVar[bool] = False

    # ---- availability -------------------------------------------------------------------
    def unavailable_reason(self, device: str = "cpu") -> str | None:
        """None when ready; else the exact reason and the fix."""
        for module, extra in self.capabilities.packages.items():
            try:
                importlib.import_module(module)
            except Exception as exc:  # a broken install raises more than ImportError
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                return f"package {module} is not importable ({detail}); install it: pip install 'qtool[{extra}]'"
        if device not in self.capabilities.devices:
            return f"needs a {' or '.join(self.capabilities.devices)} device (asked for {device})"
        if device == "cuda" and not _cuda_visible():
            return "no CUDA device is visible to torch on this machine"
        return None

    def require_available(self, device: str) -> None:
        reason = self.unavailable_reason(device)
        if reason:
            raise BackendUnavailableError(f"{self.name}: {reason}")

    # ---- spec -----------------------------------------------------------------------------
    def make_spec(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        options: dict[str, str] | None = None,
        seed: int = 0,
        calibration: CalibrationSpec | None = None,
        target: MixedTarget | None = None,
    ) -> QuantSpec:
        if target is not None:
            self.check_mixed(target, bits)
            target = target.resolved(self.mixed_defaults)
        bits = self.default_bits if bits is None else bits
        group_size = self.default_group_size if group_size is None else group_size
        if bits not in self.capabilities.bits:
            raise SpecError(
                f"{self.name} cannot quantize to {bits} bits; supported: {_join(self.capabilities.bits)}"
            )
        allowed = self.capabilities.group_sizes
        if allowed is not None and group_size not in allowed:
            raise SpecError(f"{self.name} does not support group size {group_size}; supported: {_join(allowed)}")
        if allowed is None and group_size != -1 and group_size < 1:
            raise SpecError(f"group size must be positive or -1 (per channel), got {group_size}")
        options_value = parse_options(self.Options, options or {}, self.name)
        if self.calibrates(options_value) or target is not None:  # a plan measures on calibration samples
            calibration = calibration or CalibrationSpec()
            calibration.check()
        elif calibration is not None:
            hint = (f" with these options; to calibrate, set one of {', '.join(self.calibrating_options)}, or"
                    if self.calibrating_options else ";")
            raise SpecError(f"{self.name} quantizes without calibration data{hint} "
                            "drop --calib, --nsamples, --seqlen and --bos")
        from qtool.schema import MAX_SEED

        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise SpecError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
        spec = QuantSpec(self.name, bits, group_size, options_value, seed, calibration, target)
        self.check_spec(spec)
        return spec

    def default_mixed_widths(self) -> tuple[int, ...]:
        """The widths a plan uses when --mixed-bits names none."""
        return self.mixed_default_bits or self.mixed_bits

    def mixed_widths(self, target: MixedTarget) -> tuple[int, ...]:
        """The widths `target`'s plan may use; raises SpecError for a width this backend does not offer."""
        return target.widths(self.mixed_bits, self.name, self.default_mixed_widths())

    def check_mixed(self, target: MixedTarget, bits: int | None) -> None:
        """Refuse a mixed-precision budget this backend cannot honour; raise SpecError."""
        from qtool import backends

        if not self.mixed_bits:
            able = ", ".join(n for n in backends.known_methods() if backends.get(n).mixed_bits)
            raise SpecError(f"{self.name} has no per-layer bit-widths; --target-bits/--target-size work with {able}")
        if bits is not None:
            raise SpecError("--bits and a mixed-precision budget (--target-bits/--target-size) exclude each other: "
                            f"the plan picks each layer's bits from {_join(self.mixed_widths(target))}")
        self.mixed_widths(target)
        if target.size_bytes is not None and not self.mixed_size_target:
            raise SpecError(f"{self.name} writes dense weights whatever the bits: its size does not follow a plan; "
                            "use --target-bits")
    def calibrates(self, options: Any) -> bool:
        """Whether quantizing with these options reads calibration samples. Default: the capability."""
        return self.capabilities.needs_calibration

    def check_spec(self, spec: QuantSpec) -> None:
        """Backend-specific combinations of bits and options; raise SpecError. Default: none."""
        return None

    def check_model(self, spec: QuantSpec, config: Any) -> None:
        """Check the spec against the model's config (architecture); raise SpecError. Default: none."""
        return None

    def check_layers(self, spec: QuantSpec, linears: dict[str, nn.Linear]) -> None:
        """Check the spec against the model's layer widths (from a weightless skeleton)."""
        if self.capabilities.group_sizes is not None or spec.group_size == -1:
            return
        bad = sorted({m.in_features for m in linears.values() if m.in_features % spec.group_size})
        if bad:
            widths = sorted({m.in_features for m in linears.values()})
            raise SpecError(
                f"group size {spec.group_size} does not divide the layer width {_join(bad)} of this model"
                + (f" (input widths: {_join(widths)})" if bad != widths else "")
                + f"; pick a divisor such as {_suggest(widths)} or -1 (per channel)"
            )

    # ---- work -----------------------------------------------------------------------------
    @abstractmethod
    def quantize(
        self, source: ModelSource, spec: QuantSpec, device: str, calibration: CalibrationSet | None = None,
        workdir: Path | None = None,
    ) -> Quantized | nn.Module:
        """Load the source and quantize it (weights on `device`); return a Quantized (or just the model).

        `calibration` holds the token samples when the backend's capabilities need calibration.
        `workdir` is given to `resumable` backends only: a folder that survives Ctrl-C, where the
        backend keeps finished work for `--resume` (see api.resume_folder).
        """

    def quantize_layer(self, name: str, linear: nn.Linear, spec: QuantSpec, device: str) -> nn.Module:
        """The quantized replacement of the Linear `name` (full module name; weight (out, in) on
        `device` in the compute dtype), for backends that set `streams`. May change `linear`."""
        raise NotImplementedError(f"{self.name} does not quantize one layer at a time")

    def quantize_linears(self, model: nn.Module, spec: QuantSpec, device: str) -> nn.Module:
        """Replace every Linear but the output head by `quantize_layer`'s result, in place."""
        from tqdm.auto import tqdm

        from qtool.models import linear_layers

        for name, linear in tqdm(linear_layers(model).items(), desc=self.name, unit="layer", leave=False):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, self.quantize_layer(name, linear, spec, device))
        return model

    def write_config(self, config: Any, generation_config: Any, out: Path) -> None:
        """Write config.json (and generation_config.json, when not None) as `save` would, for a
        streamed run whose weights qtool.streaming wrote. Default: as save_pretrained writes them."""
        config.save_pretrained(out)
        if generation_config is not None:
            generation_config.save_pretrained(out)

    def save(self, model: nn.Module, out: Path) -> None:
        """Write the model's weights and config into `out` (an existing, empty folder).

        Default: the standard Hugging Face checkpoint, for backends transformers can serialize.
        """
        model.save_pretrained(out)

    def load(self, path: Path, device: str) -> nn.Module:
        """Load a folder written by `save`. Default: transformers' from_pretrained."""
        return ModelSource(str(path), "folder", str(path)).load_model(device, compute_dtype(device))

    def load_for_training(self, path: Path, device: str) -> nn.Module:
        """Load a folder written by `save` with layers that support a backward pass (LoRA training).

        Default: `load`. Backends whose loader picks the kernel by hardware, and may pick an
        inference-only one, override this to ask for a trainable kernel on every machine.
        """
        return self.load(path, device)

    def kernel(self, device: str) -> str:
        """Which compute path runs this backend's layers on `device`."""
        return "unknown"

    def reload_check(self, out: Path, device: str) -> dict[str, Any] | None:
        """Backends whose loader picks a kernel at load time reload OUT to record which one.

        Default: nothing (the kernel is fixed and `kernel()` names it).
        """
        return None

    def lora_unsupported_reason(self, device: str) -> str | None:
        """Why PEFT's LoRA layer for this backend fails in training on `device`, when known. Default: None."""
        return None

    def added_parameters(self, spec: QuantSpec, config: Any) -> tuple[int, int]:
        """(parameters, tensors) the checkpoint holds beyond the model's own, unquantized (gptq
        rotate=true unties the output head). Default: none."""
        return 0, 0

    def sensitivity_transform(self, spec: QuantSpec) -> str:
        """What `sensitivity_model` does to the full-precision model before a plan measures layer
        costs on it, in words ("" = nothing); part of the cost cache's key."""
        return ""

    def sensitivity_model(self, model: nn.Module, spec: QuantSpec) -> None:
        """Turn the full-precision model, in place, into the one `quantize` will round (default: as is)."""
        return None

    def layer_bytes(self, spec: QuantSpec, out_features: int, in_features: int) -> int:
        """Bytes a (out_features, in_features) layer quantized as `spec` takes in the checkpoint.

        Default: its `effective_bits`; backends with a fixed packed layout give it exactly.
        """
        return math.ceil(out_features * in_features * self.effective_bits(spec) / 8)

    def effective_bits(self, spec: QuantSpec) -> float:
        """Storage bits per quantized weight, counting a fp16 scale and zero per group."""
        if spec.group_size == -1:
            return float(spec.bits)
        return spec.bits + 32 / spec.group_size


def parse_options(options_cls: type, raw: dict[str, str], method: str) -> Any:
    """Build the backend's Options dataclass from KEY=VALUE strings, typed by its fields."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise SpecError(f"{method} has no option {key!r}; its options: {known}")
        values[key] = _coerce(text, fields[key], method)
    return options_cls(**values)


def _coerce(text: str, f: dataclasses.Field, method: str) -> Any:
    default = f.default
    if isinstance(default, bool):
        lowered = str(text).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SpecError(f"{method} option {f.name} takes true or false, got {text!r}")
    choices = f.metadata.get("choices")
    if choices and text not in choices:
        raise SpecError(f"{method} option {f.name} takes one of {', '.join(choices)}, got {text!r}")
    try:
        return type(default)(text)
    except (TypeError, ValueError):
        raise SpecError(f"{method} option {f.name} takes a {type(default).__name__}, got {text!r}") from None


def option_help(options_cls: type) -> list[dict[str, Any]]:
    return [
        {"name": f.name, "default": f.default, "help": f.metadata.get("help", ""),
         **({"choices": list(f.metadata["choices"])} if "choices" in f.metadata else {})}
        for f in dataclasses.fields(options_cls)
    ]


def _join(values: Any) -> str:
    return ", ".join(str(v) for v in values)


def _suggest(widths: list[int]) -> str:
    common = [g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths)]
    return str(common[0]) if common else "-1"


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()
