"""Round-to-nearest: the floor every calibrated method must beat.

qtool's own few lines (no library does plain per-group RTN on a transformers model in place).
Each Linear weight but the output head is split into groups of `group_size` input columns;
each group gets a min-max grid of 2**bits levels (asymmetric, with a zero point) or a
symmetric absmax grid. The checkpoint stores the *dequantized* weights as a standard dense
HF checkpoint: rtn measures quality, it is not a storage format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qtool.backends import register
from qtool.backends.base import Backend, Capabilities, QuantSpec
from qtool.models import ModelSource
from qtool.runtime import compute_dtype


def rtn_dequantized(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """The weight after rounding to the nearest point of its group's grid."""
    rows, cols = weight.shape
    group = cols if group_size == -1 else group_size
    w = weight.float().reshape(rows, cols // group, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-10)
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
        deq = q * scale
    else:
        qmax = 2**bits - 1
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / qmax).clamp(min=1e-10)
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
        deq = (q - zero) * scale
    return deq.reshape(rows, cols).to(weight.dtype)


@dataclass
class RtnOptions:
    sym: bool = field(default=False, metadata={"help": "symmetric absmax grid around 0 (no zero point) instead of min-max with a zero point"})


@register
class RtnBackend(Backend):
    name = "rtn"
    summary = "round-to-nearest per group (baseline; stores dequantized dense weights)"
    capabilities = Capabilities(
        bits=(2, 3, 4, 5, 6, 7, 8),
        needs_calibration=False,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=True,
        format="dense safetensors (HF standard; loads anywhere, no size saving)",
    )
    Options = RtnOptions
    mixed_bits = (2, 3, 4, 8)
    mixed_size_target = False

    streams = True

    def quantize(self, source: ModelSource, spec: QuantSpec, device: str, calibration=None) -> nn.Module:
        return self.quantize_linears(source.load_model(device, compute_dtype(device)), spec, device)

    @torch.no_grad()
    def quantize_layer(self, name: str, linear: nn.Linear, spec: QuantSpec, device: str) -> nn.Module:
        linear.weight.copy_(rtn_dequantized(linear.weight, spec.bits_of(name), spec.group_size, spec.options.sym))
        return linear

    def layer_bytes(self, spec: QuantSpec, out_features: int, in_features: int) -> int:
        """Dense: the dequantized weight in fp32 (the CPU compute dtype) whatever the bits."""
        return out_features * in_features * 4

    def kernel(self, device: str) -> str:
        return f"dense {'fp32' if device == 'cpu' else 'bf16'} matmul (weights stored dequantized)"
