"""Walk a decoder model block by block, the way GPTQ-style quantizers feed calibration data.

The calibration samples enter the first decoder block (its inputs and keyword arguments are
captured by a hook that stops the forward there), each block is quantized against the inputs it
sees, and the quantized block's outputs become the next block's inputs: only one block's
activations are resident. Used by aqlm and by the compressed-tensors formats' GPTQ rounding.
GPTQModel and llm-compressor have the same walk inside their own pipelines, which write their own
formats, so it is not reachable from outside them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtool.errors import SpecError


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (`model.model.layers`). Raises SpecError."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise SpecError(f"cannot find the decoder blocks of {type(model).__name__} (expected model.layers)")
    return blocks


class _Captured(Exception):
    pass


def block_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first block's input hidden states for every sample, and its keyword arguments (batch 1, broadcastable)."""
    hidden: list[torch.Tensor] = []
    captured: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in ids:
            try:
                with torch.no_grad():
                    model(row[None, :], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    captured["use_cache"] = False
    captured["past_key_values"] = None
    return torch.cat(hidden), captured


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], chunk: int = 8) -> torch.Tensor:
    """The block's outputs [samples, tokens, hidden] for inputs `hidden` of that shape, `chunk` samples at a time."""
    outs = []
    for i in range(0, hidden.shape[0], chunk):
        out = block(hidden[i : i + chunk], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of the block by its name inside the block (e.g. `self_attn.q_proj`)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
