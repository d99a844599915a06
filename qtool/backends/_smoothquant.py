"""SmoothQuant (Xiao et al., 2023, arXiv:2211.10438): migrate activation outliers into the weights.

For each RMSNorm and the Linears it feeds (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, llm-compressor's default Llama mappings), per input channel j:
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
X_j is divided by s_j (folded into the norm's weight) and W_:,j multiplied by it, so the network
computes the same function while int8 per-token activation scales no longer waste their range
on a few outlier channels. max|X_j| is taken over the calibration samples in one full-precision
pass, as the paper does.

qtool's own few lines: llm-compressor's SmoothQuantModifier is the library version, but
llm-compressor cannot be installed beside qtool's transformers (see _compressed_tensors.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qtool.calibration import CalibrationSet

SMOOTHABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_MAPPINGS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def smoothing_groups(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
    """(name, norm, the Linears that read its output) for every decoder layer."""
    groups = []
    for index, layer in enumerate(model.model.layers):
        for norm_name, linear_names in _MAPPINGS:
            groups.append((f"model.layers.{index}.{norm_name}", layer.get_submodule(norm_name),
                           [layer.get_submodule(n) for n in linear_names]))
    return groups


@torch.no_grad()
def activation_absmax(model: nn.Module, norms: list[nn.Module], calibration: CalibrationSet) -> dict[nn.Module, torch.Tensor]:
    """Per-channel max|X| of each norm's output over all calibration tokens; shape (hidden,)."""
    peaks: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        peak = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
        peaks[module] = torch.maximum(peaks[module], peak) if module in peaks else peak

    handles = [norm.register_forward_hook(hook) for norm in norms]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(calibration.samples, desc="smoothquant", unit="sample", leave=False):
            model(torch.tensor([ids], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return peaks


@torch.no_grad()
def smooth(model: nn.Module, calibration: CalibrationSet, alpha: float) -> dict[str, Any]:
    """Smooth every norm → Linears group in place; return what qtool.json records.

    Raises nothing for a known architecture (the backend checks model_type before loading).
    """
    groups = smoothing_groups(model)
    peaks = activation_absmax(model, [norm for _, norm, _ in groups], calibration)
    factors = []
    for _name, norm, linears in groups:
        weight_peak = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).float()
        s = (peaks[norm].pow(alpha) / weight_peak.pow(1 - alpha)).clamp(min=1e-5)
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        factors.append(s)
    stacked = torch.stack(factors)
    return {"method": "SmoothQuant (arXiv:2211.10438)", "alpha": alpha, "groups": len(groups),
            "mappings": {norm: list(linears) for norm, linears in _MAPPINGS},
            "factor_range": [round(stacked.min().item(), 4), round(stacked.max().item(), 4)]}
