"""AWQ (Lin et al., 2024): activation-aware per-channel scaling before group quantization.

AutoAWQ is deprecated and broken under transformers 5; its algorithm lives on in GPTQModel
and in llm-compressor. qtool uses GPTQModel's AWQ for the same reason as its gptq backend:
llm-compressor 0.14 pins transformers <= 5.17 (qtool runs 5.23) and, on CPU, fails in
`pin_memory()` without a patch. GPTQModel searches the per-channel scales and the clipping
range layer by layer on the calibration activations, then writes the standard AWQ GEMM layout
(`quant_method: awq`, int32-packed qweight/qzeros/scales) that transformers (through
GPTQModel), vLLM and SGLang load.

Two adjustments for the CPU, both scoped to qtool's calls: GPTQModel's AWQ clip search is
replaced by an equivalent one that does not thrash memory (see _awq_clip.py), and its CPU AWQ
layer, whose code handles fp32 activations (scales are stored fp16 either way), is allowed to run
in fp32, because bf16 matmuls are ~5x slower on CPUs without bf16 units.

`--opt gptq=true` keeps AWQ's scales but rounds with GPTQ instead of AWQ's clip search and
round-to-nearest (_awq_gptq.py); the checkpoint format is the same. On SmolLM2-135M 4-bit g64 it
took WikiText-2 PPL from +11.0/+13.2 % to +7.3/+7.0 % over the base (README table).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from qtool.backends import register
from qtool.backends._awq_clip import batched_clip_search
from qtool.backends._awq_gptq import gptq_rounding
from qtool.backends._gptqmodel import (
    GptqModelBackend,
    accepting_fp32,
    check_rounding_damp,
    dynamic_overrides,
    quantize_with_gptqmodel,
    rounding_damp_field,
)
from qtool.backends.base import Capabilities, Quantized, QuantSpec
from qtool.calibration import CalibrationSet
from qtool.models import ModelSource, quantizable_linears


@dataclass
class AwqOptions:
    sym: bool = field(default=False, metadata={"help": "symmetric grid; AWQ's default is a zero point per group (false)"})
    offload_to_disk: bool = field(default=True, metadata={"help": "move finished layers to disk while quantizing (for models larger than memory)"})
    gptq: bool = field(default=False, metadata={"help": "keep AWQ's scales, then round with GPTQ (act-order, range search) instead of AWQ's clip search and round-to-nearest (AWQ paper, section 5); same AWQ checkpoint"})
    damp_percent: float = rounding_damp_field()


@register
class AwqBackend(GptqModelBackend):
    name = "awq"
    summary = "AWQ via GPTQModel: activation-aware scaling, calibrated, standard AWQ GEMM checkpoint (transformers, vLLM)"
    capabilities = Capabilities(
        bits=(2, 3, 4, 8),
        needs_calibration=True,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=True,
        packages={"gptqmodel": "gptq"},
        format="AWQ GEMM (int32-packed, zero points; quant_method awq in config.json): transformers + gptqmodel, vLLM, SGLang, TGI",
    )
    Options = AwqOptions
    loading_config = "AwqConfig"
    stores_g_idx = False
    stored_tensors_per_layer = 3
    mixed_kernel = "awq_torch"
    torch_layer = ("gptqmodel.nn_modules.qlinear.torch_awq", "AwqTorchLinear")

    def check_spec(self, spec: QuantSpec) -> None:
        super().check_spec(spec)
        check_rounding_damp(self.name, spec.options.damp_percent, spec.options.gptq)

    def quantize(
        self, source: ModelSource, spec: QuantSpec, device: str, calibration: CalibrationSet | None = None
    ) -> Quantized:
        from gptqmodel.quantization.config import AWQConfig

        def config(offload_dir: str):
            return AWQConfig(
                bits=spec.bits, group_size=spec.group_size, sym=spec.options.sym,
                offload_to_disk=spec.options.offload_to_disk, offload_to_disk_path=offload_dir,
                dynamic=dynamic_overrides(spec),
            )

        modules = len(quantizable_linears(source.config()))
        rounding = gptq_rounding(spec.options.damp_percent) if spec.options.gptq else contextlib.nullcontext()
        with batched_clip_search(), fp32_awq_layers(), rounding:
            return quantize_with_gptqmodel(source, config, calibration, device, "awq", modules)

    def save(self, model: nn.Module, out: Path) -> None:
        with fp32_awq_layers():
            super().save(model, out)

    def load_with_kernel(self, path: Path, device: str, kernel: str) -> nn.Module:
        with fp32_awq_layers():
            return super().load_with_kernel(path, device, kernel)

    def kernel(self, device: str) -> str:
        if device == "cpu":
            return "gptqmodel AWQ torch kernel on CPU, picked at load"
        return "fastest GPTQModel AWQ CUDA kernel (Marlin, GEMM/GEMV, ExLlama), picked at load"


def fp32_awq_layers() -> contextlib.AbstractContextManager[None]:
    """Let GPTQModel's torch AWQ layer take fp32 (it converts scales to fp16 and casts the
    dequantized weight to the input's dtype; only its declared dtype list says fp16/bf16)."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    return accepting_fp32(AwqTorchLinear)
