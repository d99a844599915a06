"""4-bit float weights: MXFP4 (OCP Microscaling) and NVFP4, in compressed-tensors' packed formats.

Both store E2M1 codes (values 0, ±0.5 … ±6), two per byte, weight-only here (activations stay
in the compute dtype, the `A16` presets):
- `mxfp4`: groups of 32 input columns, each with a power-of-two E8M0 scale (OCP MX v1.0 spec);
- `nvfp4`: groups of 16, each with an FP8 E4M3 scale, plus one FP32 global scale per tensor that
  brings the group scales into E4M3's range (NVIDIA's Blackwell format).
Scales are min-max (absmax) per group, as llm-compressor's default observer takes them. vLLM runs
both on Blackwell GPUs (and emulates NVFP4 on older ones); on CPU qtool evaluates by emulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qtool.backends import register
from qtool.backends._compressed_tensors import (
    CompressedTensorsBackend,
    check_group_widths,
    kv_cache_field,
    observer_field,
)
from qtool.backends.base import Capabilities, QuantSpec


@dataclass
class Fp4Options:
    observer: str = observer_field()
    kv_cache: str = kv_cache_field()


class _Fp4Backend(CompressedTensorsBackend):
    Options = Fp4Options
    weight_only = True
    scale_bits: int

    def check_layers(self, spec: QuantSpec, linears: dict[str, nn.Linear]) -> None:
        check_group_widths(linears, spec.group_size, self.name)

    def effective_bits(self, spec: QuantSpec) -> float:
        return 4 + self.scale_bits / spec.group_size


def _capabilities(group: int, scales: str) -> Capabilities:
    return Capabilities(
        bits=(4,),
        needs_calibration=False,  # only with kv_cache=fp8
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=False,
        packages={"compressed_tensors": "ct"},
        group_sizes=(group,),
        format=f"compressed-tensors {scales} (E2M1 packed, group {group}); vLLM loads it (FP4 GEMM on Blackwell)",
    )


@register
class Mxfp4Backend(_Fp4Backend):
    name = "mxfp4"
    summary = "MXFP4 weights: E2M1, group 32, power-of-two E8M0 scales (OCP MX): compressed-tensors"
    capabilities = _capabilities(32, "mxfp4-pack-quantized")
    default_group_size = 32
    weight_kind = "mxfp4"
    scale_bits = 8


@register
class Nvfp4Backend(_Fp4Backend):
    name = "nvfp4"
    summary = "NVFP4 weights: E2M1, group 16, FP8 E4M3 scales + FP32 global scale: compressed-tensors"
    capabilities = _capabilities(16, "nvfp4-pack-quantized")
    default_group_size = 16
    weight_kind = "nvfp4"
    scale_bits = 8


