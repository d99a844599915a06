"""Checkpoints for backends whose layers transformers cannot serialize: the model's state dict
as safetensors plus its config (qtool.streaming writes the same tensors in shards), and the reverse (skeleton on the meta device, swap in the
backend's layers, assign the tensors). No pickle on either side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"


def save_state_checkpoint(model: nn.Module, out: Path, quant_method: str) -> None:
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # restored by tie_weights() on load
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    write_state_config(model.config, getattr(model, "generation_config", None), out, quant_method)


def write_state_config(config: Any, generation_config: Any, out: Path, quant_method: str) -> None:
    """config.json (tagged with `quant_method`) and generation_config.json (when not None)."""
    config.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    # Tag config.json so that plain transformers refuses the folder instead of loading random weights.
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": quant_method, "loader": "qtool.load()"}
    path.write_text(json.dumps(config, indent=2) + "\n")


def load_state_checkpoint(
    path: Path, device: str, dtype: torch.dtype, marker: str, make_layer: Callable[[nn.Linear], nn.Module]
) -> nn.Module:
    """Rebuild the model: every Linear whose state holds `<name>.<marker>` becomes make_layer(linear)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):  # one file, or the shards of a streamed run
        state |= load_file(str(file), device=device)
    suffix = f".{marker}"
    for name in sorted(k[: -len(suffix)] for k in state if k.endswith(suffix)):
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, make_layer(model.get_submodule(name)))
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not match the config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    return model.to(device).eval()
