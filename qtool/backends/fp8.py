"""FP8 E4M3 weights and activations (W8A8-FP8), in compressed-tensors' float-quantized format.

Weights: one absmax scale per output channel (scale = max|W_row| / 448). Activations: by default
one scale per token computed on the fly (dynamic, no calibration: llm-compressor's FP8_DYNAMIC
scheme); `activations=static` instead takes one per-tensor scale per layer from the calibration
samples (absmax; the FP8 scheme vLLM runs with static scales). This is the format Hopper and
Blackwell deployments serve (vLLM, SGLang, TensorRT-LLM read it). See _compressed_tensors.py for
how the checkpoint is written and what runs on CPU (emulation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class Fp8Options:
    activations: str = field(default="dynamic", metadata={"choices": ("dynamic", "static"), "help": (
        "dynamic: one scale per token at run time (no calibration); static: one calibrated scale per layer")})
    observer: str = observer_field()
    gptq: bool = gptq_field()
    damp_percent: float = rounding_damp_field()
    kv_cache: str = kv_cache_field()


@register
class Fp8Backend(CompressedTensorsBackend):
    name = "fp8"
    summary = "FP8 E4M3 weights (per channel) and activations (per token, or static per tensor): compressed-tensors"
    # calibrates for activations=static, gptq=true or kv_cache=fp8 (see calibrates)
    capabilities = ct_capabilities(8, -1, "compressed-tensors float-quantized (FP8 E4M3); vLLM and SGLang serve it "
                                   "with FP8 GEMMs on Ada/Hopper GPUs (not run here)")
    Options = Fp8Options
    default_bits = 8
    default_group_size = -1
    weight_kind = "fp8"
    calibrating_options = ("activations=static", "gptq=true", "kv_cache=fp8")

    def activations(self, options: Any) -> Any:
        return activation_args("fp8", static=self.static_activations(options))

    def static_activations(self, options: Any) -> bool:
        return options.activations == "static"
