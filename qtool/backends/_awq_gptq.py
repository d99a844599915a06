"""AWQ's scaling, then GPTQ's rounding, written as the same AWQ checkpoint.

AWQ (Lin et al., 2024) scales salient input channels, searches a clipping range per group, and
rounds every scaled weight to the nearest grid point. Its paper (section 5, "AWQ is orthogonal to
GPTQ") combines the scaling with GPTQ's error-feedback rounding, and llm-compressor ships the same
pairing as an AWQ + GPTQ recipe (writing compressed-tensors). GPTQModel's AWQ has no such switch,
so for qtool's call this module replaces, in `AWQProcessor`:
- the clip search, by nothing: GPTQ searches each group's range itself (the GPTQ paper's `--mse`
  grid search, norm 2.4), and AWQ's clip was chosen for round-to-nearest;
- the round-to-nearest in `apply_quant`, by GPTQModel's own GPTQ solver (act-order with static
  groups), fed with the calibration activations AWQ holds for that linear, already divided by
  AWQ's scales as the weight was multiplied by them.
On SmolLM2-135M 4-bit g64 (README) that order of choices measured best: keeping AWQ's clip, or
GPTQ without act-order, was worse.

GPTQ with static groups returns weights on a per-group grid in natural column order, with that
grid's scales and zero points in the layout AWQ packs ([out_features, groups],
value = (code - zero) * scale), so OUT stays a standard AWQ GEMM checkpoint. AWQ's scale search
itself is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# The GPTQ paper's range search: shrink each group's range on a 100-step grid down to 20 % and
# keep the one minimising |error|^2.4 (GPTQModel's Quantizer defaults for grid and shrink).
RANGE_SEARCH_NORM = 2.4


def gptq_round(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int, sym: bool,
               damp_percent: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round `weight` [out, in] with GPTQ on `inputs` [..., in]: (dequantized weight, scales, zeros),
    scales and zeros shaped [out, in // group_size] as AWQ's own rounding returns them."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = weight.detach().to(torch.float32).clone()
    config = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=True, act_group_aware=False,
                            damp_percent=damp_percent, mse=RANGE_SEARCH_NORM, offload_to_disk=False)
    solver = GPTQ(linear, config)
    solver.quantizer.configure(perchannel=True)
    # GPTQModel keeps AWQ's captured activations on the CPU; the solver runs where the weight is.
    for rows in inputs.reshape(-1, in_features).to(weight.device, torch.float32).split(512):
        solver.add_batch(rows.unsqueeze(0), None)
    # Static groups: each group's grid is fixed before act-order permutes the columns, so the
    # groups stay contiguous and the result fits AWQ's layout (which has no g_idx).
    scales, zeros, *_ = solver.hf_quantize(group_size=group_size, percdamp=damp_percent, actorder=True,
                                           static_groups=True)
    dtype = weight.dtype
    return linear.weight.data.to(dtype), scales.to(dtype), zeros.to(dtype)


@contextlib.contextmanager
def gptq_rounding(damp_percent: float) -> Iterator[None]:
    """Within the block, GPTQModel's AWQ skips its clip search and rounds each scaled linear with GPTQ."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    search_clip, apply_quant = AWQProcessor._search_best_clip, AWQProcessor.apply_quant

    def keep_features_skip_clip(self: Any, layer: Any, named_linears: Any, input_feat: dict[str, torch.Tensor]) -> list:
        # AWQ hands its clip search the per-linear activations, already divided by its scales.
        self.qtool_scaled_inputs = input_feat
        return []  # no clipping: GPTQ's range search takes its place

    def quantize_with_gptq(self: Any, named_linears: dict[str, Any], scales_list: Any) -> None:
        q, scaled_inputs = self.qcfg, getattr(self, "qtool_scaled_inputs", None) or {}
        for name, named_module in named_linears.items():
            inputs = scaled_inputs.get(name)
            if inputs is None or inputs.numel() == 0:  # GPTQModel's fallback path: no activations
                apply_quant(self, {name: named_module}, scales_list)
                continue
            self.pseudo_quantize_tensor = lambda w, x=inputs: gptq_round(w, x, q.bits, q.group_size, q.sym, damp_percent)
            try:
                apply_quant(self, {name: named_module}, scales_list)
            finally:
                del self.pseudo_quantize_tensor
        self.qtool_scaled_inputs = None

    AWQProcessor._search_best_clip, AWQProcessor.apply_quant = keep_features_skip_clip, quantize_with_gptq
    try:
        yield
    finally:
        AWQProcessor._search_best_clip, AWQProcessor.apply_quant = search_clip, apply_quant
