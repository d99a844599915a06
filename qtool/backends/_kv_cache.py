"""FP8 KV cache: calibrate per-layer K and V scales, and emulate the cache's rounding on CPU.

vLLM quantizes what it writes to the KV cache with one scale per layer for K and one for V,
read from the checkpoint as `model.layers.N.self_attn.{k,v}_scale` (compressed-tensors'
`kv_cache_scheme`). Keys are stored after RoPE, so their scale must be taken there.

compressed-tensors 0.17 (and 0.20) observes K/V by replacing the attention's `past_key_values`
argument, which transformers 5.24 renamed `cache`: its hook no longer fires, neither when
calibrating nor when a checkpoint is evaluated. qtool therefore reaches K and V through
transformers' own extension point for attention, `AttentionInterface`: one registered function
records max|K| and max|V| per layer (calibration), another quantize-dequantizes K and V with the
layer's scales before attention (evaluation); both then run transformers' SDPA attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

OBSERVE = "qtool_observe_kv"
EMULATE_FP8 = "qtool_fp8_kv_cache"
_PEAK = "_qtool_kv_peak"


def _sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def _observing_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         *args: Any, **kwargs: Any):
    peak = torch.stack([key.detach().abs().amax().float(), value.detach().abs().amax().float()])
    previous = getattr(module, _PEAK, None)
    setattr(module, _PEAK, peak if previous is None else torch.maximum(previous, peak))
    return _sdpa(module, query, key, value, *args, **kwargs)


def _fp8_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      *args: Any, **kwargs: Any):
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    scheme = getattr(module, "quantization_scheme", None)
    if scheme is not None and getattr(module, "k_scale", None) is not None:
        key = forward_quantize(module, key, "k", scheme.input_activations)
        value = forward_quantize(module, value, "v", scheme.input_activations)
    return _sdpa(module, query, key, value, *args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, function in ((OBSERVE, _observing_attention), (EMULATE_FP8, _fp8_kv_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


@contextmanager
def observing(model: nn.Module) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """Within the block the model records max|K| (after RoPE) and max|V| of every attention module;
    the dict it yields is filled on exit: attention module -> tensor([max|K|, max|V|])."""
    _register()
    previous = model.config._attn_implementation
    peaks: dict[nn.Module, torch.Tensor] = {}
    model.set_attn_implementation(OBSERVE)
    try:
        yield peaks
    finally:
        model.set_attn_implementation(previous)
        for module in model.modules():
            if hasattr(module, _PEAK):
                peaks[module] = getattr(module, _PEAK)
                delattr(module, _PEAK)


def emulate_fp8_cache(model: nn.Module) -> None:
    """Make the model round K and V through FP8 with each layer's k_scale/v_scale (as vLLM's FP8
    cache stores them) before attention."""
    _register()
    model.set_attn_implementation(EMULATE_FP8)
