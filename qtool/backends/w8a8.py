"""INT8 weights and activations (W8A8) with SmoothQuant, in compressed-tensors' int-quantized format.

Weights: symmetric int8, one scale per output channel. Activations: symmetric int8, one scale per
token at run time (dynamic). Before the scales are taken, SmoothQuant (Xiao et al., 2023,
arXiv:2211.10438) moves activation outliers into the weights with per-channel factors folded into
the preceding RMSNorm (qtool.backends._smoothquant); `smoothquant=false` skips it (plain W8A8, the
comparison the paper makes). vLLM runs this format with int8 GEMMs on CPU (oneDNN) and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from qtool.backends import register
from qtool.backends._compressed_tensors import (
    CompressedTensorsBackend,
    activation_args,
    ct_capabilities,
    gptq_field,
    kv_cache_field,
    observer_field,
)
from qtool.backends._gptqmodel import rounding_damp_field
from qtool.backends._smoothquant import SMOOTHABLE_MODEL_TYPES, smooth
from qtool.backends.base import QuantSpec
from qtool.calibration import CalibrationSet
from qtool.errors import SpecError


@dataclass
class W8a8Options:
    smoothquant: bool = field(default=True, metadata={"help": "migrate activation outliers into the weights first (calibrated)"})
    alpha: float = field(default=0.5, metadata={"help": (
        "SmoothQuant migration strength in [0, 1]: s = max|X|^alpha / max|W|^(1-alpha) (the paper's default 0.5)")})
    observer: str = observer_field()
    gptq: bool = gptq_field()
    damp_percent: float = rounding_damp_field()
    kv_cache: str = kv_cache_field()


@register
class W8a8Backend(CompressedTensorsBackend):
    name = "w8a8"
    summary = "INT8 weights (per channel) and activations (per token), SmoothQuant smoothing: compressed-tensors"
    # calibrates with smoothquant=true (the default), gptq=true or kv_cache=fp8 (see calibrates)
    capabilities = ct_capabilities(8, -1, "compressed-tensors int-quantized (INT8 W8A8); vLLM runs it with int8 "
                                   "GEMMs (CPU: checked here; CUDA)")
    Options = W8a8Options
    default_bits = 8
    default_group_size = -1
    weight_kind = "int8"
    calibrating_options = ("smoothquant=true", "gptq=true", "kv_cache=fp8")

    def check_spec(self, spec: QuantSpec) -> None:
        super().check_spec(spec)
        if not spec.options.smoothquant and spec.options.alpha != W8a8Options.alpha:
            raise SpecError("w8a8 option alpha is SmoothQuant's migration strength; it has no effect with smoothquant=false")
        if not 0.0 <= spec.options.alpha <= 1.0:
            raise SpecError(f"w8a8 option alpha is SmoothQuant's migration strength, from 0 to 1; got {spec.options.alpha}")

    def check_model(self, spec: QuantSpec, config: Any) -> None:
        model_type = getattr(config, "model_type", None)
        if spec.options.smoothquant and model_type not in SMOOTHABLE_MODEL_TYPES:
            raise SpecError(f"w8a8's SmoothQuant knows the decoder layers of {', '.join(SMOOTHABLE_MODEL_TYPES)}, "
                            f"not {model_type!r}; pass --opt smoothquant=false for plain W8A8")

    def activations(self, options: Any) -> Any:
        return activation_args("int8", static=False)

    def calibrates(self, options: Any) -> bool:
        return options.smoothquant or super().calibrates(options)

    def prepare(self, model: nn.Module, spec: QuantSpec, calibration: CalibrationSet | None) -> dict[str, Any]:
        if not spec.options.smoothquant:
            return {"smoothquant": None}
        assert calibration is not None
        return {"smoothquant": smooth(model, calibration, spec.options.alpha)}
