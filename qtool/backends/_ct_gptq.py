"""GPTQ rounding for the compressed-tensors formats (FP8, INT8 W8A8, MXFP4, NVFP4): `gptq=true`.

Round-to-nearest puts every weight on the format's nearest grid point. GPTQ (Frantar et al., 2023,
arXiv:2210.17323) rounds one input column at a time and moves each column's rounding error onto
the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs (H = XᵀX over
the calibration tokens), so it minimises the layer's output error ‖WX − QX‖² rather than the
weight error. llm-compressor's GPTQModifier does this for every compressed-tensors scheme (its
FP8, W8A8, MXFP4 and NVFP4 recipes); it cannot be installed beside qtool (pins, see
_compressed_tensors.py), so the pieces are put together here from the two libraries qtool has:
- the solver is GPTQModel's own `GPTQ` class (the one qtool's gptq backend runs), with act-order;
  its integer quantizer is replaced by `FormatQuantizer`, which takes scales from qtool's
  observers (compressed-tensors' `calculate_qparams`) and rounds with compressed-tensors'
  `fake_quantize`, so the grid is the format's (E4M3, INT8, or E2M1 with E8M0 or E4M3 group
  scales), not GPTQ's integer grid;
- the scales are fixed before rounding, from the original weight: per output channel, or per
  group with GPTQ's static groups (groups stay contiguous, as the formats store them, even though
  act-order visits columns out of order). These are the scales `set_weight_scales` stores, so the
  checkpoint holds exactly the scales the solver rounded to (checked per layer);
- the model is walked block by block (qtool.backends._blocks): each block's Hessians come from
  the outputs of the blocks already rounded, as in GPTQ and llm-compressor's sequential pipeline.
  Activations stay unquantized during the walk (static activation scales are calibrated after).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qtool.backends._blocks import block_inputs, block_linears, decoder_blocks, run_block
from qtool.calibration import CalibrationSet


class FormatQuantizer:
    """GPTQModel's quantizer interface (`find_params`, `quantize`, `scale`, `zero`) over a
    compressed-tensors weight format `args` (QuantizationArgs)."""

    _maxq_value = -1  # not an integer grid: keeps GPTQModel's fused CUDA update (integer only) off

    def __init__(self, args: Any, observer: str, global_scale: torch.Tensor | None):
        from compressed_tensors.quantization import QuantizationStrategy

        self.args, self.observer, self.global_scale = args, observer, global_scale
        # One column at a time is rounded with its row's (or its group's) scale: a per-channel view of the format.
        self.column_args = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None})
        self.qparams: tuple[torch.Tensor, torch.Tensor] | None = None  # in the format's dtypes (FP8 scales...)
        self.scale: torch.Tensor | None = None  # fp32 copies, for GPTQModel's bookkeeping
        self.zero: torch.Tensor | None = None

    def find_params(self, x: torch.Tensor, weight: bool = True) -> None:
        """Scales for `x` [out, columns]: a whole weight, or one group of columns ([out, 1] scales)."""
        from qtool.backends._compressed_tensors import weight_qparams

        self.qparams = weight_qparams(x.float(), self.args, self.observer, self.global_scale)
        self.scale, self.zero = (t.float() for t in self.qparams)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [out, 1], one column, rounded to the format's grid with the current scales (dequantized)."""
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        scale, zero = self.qparams
        return fake_quantize(x, scale, zero, self.column_args, global_scale=self.global_scale)


def group_size_of(args: Any) -> int:
    """The format's group along the input width, or -1 for one scale per output channel."""
    from qtool.backends._compressed_tensors import strategy_name

    return int(args.group_size) if strategy_name(args) in ("group", "tensor_group") else -1


def gptq_solver(linear: nn.Linear, bits: int, damp_percent: float) -> tuple[Any, nn.Linear]:
    """(GPTQModel's GPTQ solver, the fp32 copy of `linear`'s weight it works on): feed it with
    `solver.add_batch(inputs [batch, tokens, in], None)`, then `round_linear`. `bits` (8 or 4) only
    sizes GPTQModel's config; the grid is set by `round_linear`."""
    from qtool.backends._gptqmodel import import_quietly

    import_quietly()  # its banner and notices would land on stdout (and in --json output)
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    copy = nn.Linear(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
    copy.weight.data = linear.weight.detach().float().clone()
    config = QuantizeConfig(bits=bits, group_size=-1, sym=True, desc_act=True, act_group_aware=False,
                            damp_percent=damp_percent, offload_to_disk=False)
    return GPTQ(copy, config), copy


@torch.no_grad()
def round_linear(linear: nn.Module, solver: Any, copy: nn.Linear, observer: str, damp_percent: float) -> float:
    """Round `linear`'s weight with GPTQ on the Hessian `solver` collected; the weight is replaced by
    its dequantized values, on the grid of the scales already stored on the module. Returns GPTQ's
    mean loss. Raises RuntimeError if the rounded weight is not on that grid (a bug, not bad input)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = linear.quantization_scheme.weights
    global_scale = getattr(linear, "weight_global_scale", None)
    global_scale = None if global_scale is None else global_scale.data
    solver.quantizer = FormatQuantizer(args, observer, global_scale)
    group = group_size_of(args)
    _scales, _zeros, _g_idx, _seconds, loss, _damp = solver.hf_quantize(
        blocksize=128, percdamp=damp_percent, group_size=group, actorder=True, static_groups=group > 0)
    rounded = copy.weight.data
    zero_point = getattr(linear, "weight_zero_point", None)
    again = fake_quantize(rounded, linear.weight_scale.data, None if zero_point is None else zero_point.data,
                          args, global_scale=global_scale)
    if not torch.equal(again, rounded):
        raise RuntimeError(f"GPTQ rounding left weights off the stored grid (max {(again - rounded).abs().max():.3g})")
    linear.weight.data = rounded.to(linear.weight.dtype)
    solver.free()
    return float(loss)


@torch.no_grad()
def gptq_round(model: nn.Module, calibration: CalibrationSet, bits: int, observer: str,
               damp_percent: float) -> dict[str, Any]:
    """Round every compressed-tensors-quantized Linear of `model` with GPTQ, block by block, on the
    calibration samples (token ids, [samples, tokens]). The weight scales must already be set
    (`set_weight_scales`, same `observer`). `bits` only sizes GPTQModel's config (8 or 4).
    Returns what qtool.json records: solver, settings, tokens, mean loss per block, seconds."""
    from importlib.metadata import version

    from qtool.backends._compressed_tensors import quantization_disabled

    started = time.perf_counter()
    device = next(model.parameters()).device
    blocks = decoder_blocks(model)
    ids = torch.tensor(calibration.samples, device=device)
    losses = []
    with quantization_disabled(model):  # weights are rounded in place; activations stay in full precision
        hidden, kwargs = block_inputs(model, blocks[0], ids)
        for block in tqdm(blocks, desc="gptq rounding", unit="block", leave=False):
            linears = {name: m for name, m in block_linears(block).items()
                       if getattr(m, "quantization_scheme", None) is not None}
            solvers = {name: gptq_solver(m, bits, damp_percent) for name, m in linears.items()}
            handles = [m.register_forward_hook(
                lambda _m, args, _out, s=solvers[name][0]: s.add_batch(args[0].detach().float(), None))
                for name, m in linears.items()]
            try:
                run_block(block, hidden, kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            block_loss = [round_linear(m, *solvers[name], observer, damp_percent) for name, m in linears.items()]
            losses.append(round(sum(block_loss) / max(len(block_loss), 1), 6))
            hidden = run_block(block, hidden, kwargs)
    return {"rounding": "gptq", "solver": f"GPTQModel {version('gptqmodel')} GPTQ, compressed-tensors grid",
            "act_order": True, "static_groups": True, "damp_percent": damp_percent,
            "samples": int(ids.shape[0]), "tokens": int(ids.numel()), "mean_loss_per_block": losses,
            "seconds": round(time.perf_counter() - started, 1)}
