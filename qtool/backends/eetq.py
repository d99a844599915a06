"""EETQ's scheme: int8 weights, one symmetric scale per output channel, activations unquantized.

The `eetq` package has no installable distribution on PyPI and runs only on CUDA, and its
checkpoint layout is the interleaved one its CUTLASS kernel wants. So qtool quantizes to the
same scheme itself (absmax per output row, round to [-127, 127]) and runs the layers with its
own Int8WeightOnlyLinear, which converts the int8 weight for each matmul and applies the
per-row scale to the output. PyTorch's fused CPU kernel `torch._weight_int8pack_mm` was measured
here on an idle AVX2 CPU (576 -> 1536 layer): 246 ms for a 512-token window against 7.0 ms
(fp32 matmul alone: 6.4 ms), and 0.57 against 0.64 ms for one token, so it is not used.
Checkpoints are qtool's own safetensors (int8 weight + per-row scale), reloaded with qtool.load().
Running them through EETQ's CUDA kernels is left to the GPU work: it is not verifiable on this
project's machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qtool.backends import register
from qtool.backends._state import load_state_checkpoint, save_state_checkpoint, write_state_config
from qtool.backends.base import Backend, Capabilities, QuantSpec
from qtool.models import ModelSource
from qtool.runtime import compute_dtype

QUANT_METHOD = "qtool-int8-weight-only"


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (int8 W * scale)^T + b, with W stored as int8 (out, in) and scale (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        w = linear.weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, linear.weight.device)
        layer.weight.copy_(torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
        layer.weight_scale.copy_(scale.to(linear.weight.dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.weight_scale.dtype) * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is per output row, so it applies to the output: one pass over the weight fewer.
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@register
class EetqBackend(Backend):
    name = "eetq"
    summary = "EETQ scheme: int8 per-channel weight-only (qtool's int8 kernel path; EETQ CUDA kernels not wired)"
    capabilities = Capabilities(
        bits=(8,),
        needs_calibration=False,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=False,  # PEFT has no LoRA layer for qtool's Int8WeightOnlyLinear
        group_sizes=(-1,),
        format="safetensors: int8 weight + per-row scale; reload with qtool.load()",
    )
    default_bits = 8
    default_group_size = -1

    streams = True

    def quantize(self, source: ModelSource, spec: QuantSpec, device: str, calibration=None) -> nn.Module:
        return self.quantize_linears(source.load_model(device, compute_dtype(device)), spec, device)

    def quantize_layer(self, name: str, linear: nn.Linear, spec: QuantSpec, device: str) -> nn.Module:
        return Int8WeightOnlyLinear.from_linear(linear)

    def save(self, model: nn.Module, out: Path) -> None:
        save_state_checkpoint(model, out, quant_method=QUANT_METHOD)

    def write_config(self, config: Any, generation_config: Any, out: Path) -> None:
        write_state_config(config, generation_config, out, quant_method=QUANT_METHOD)

    def load(self, path: Path, device: str) -> nn.Module:
        dtype = compute_dtype(device)
        return load_state_checkpoint(
            path, device, dtype, marker="weight_scale",
            make_layer=lambda linear: Int8WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device),
        )

    def kernel(self, device: str) -> str:
        return f"qtool Int8WeightOnlyLinear on {device}: dequantize + dense matmul (EETQ CUDA kernels not wired)"

    def effective_bits(self, spec: QuantSpec) -> float:
        return 8.0
