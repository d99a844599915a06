"""HQQ (half-quadratic quantization): calibration-free 1-8 bit weights, through hqq's own API.

transformers 5 removed HqqConfig, so qtool calls `AutoHQQHFModel.quantize_model` itself.
hqq saves with torch.save (a pickle); qtool instead writes the HQQLinear state dicts, which hqq
encodes as plain tensors, to safetensors, and rebuilds the model from config + those tensors:
loading a qtool hqq checkpoint never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from qtool.backends import register
from qtool.backends.base import Backend, Capabilities, QuantSpec
from qtool.runtime import compute_dtype

WEIGHTS_NAME = "model.safetensors"


@dataclass
class HqqOptions:
    optimize: bool = field(default=True, metadata={"help": "run HQQ's half-quadratic solver for the zero points (else plain RTN grid)"})


@register
class HqqBackend(Backend):
    name = "hqq"
    summary = "HQQ half-quadratic quantization, calibration-free, 1-8 bits with groups"
    capabilities = Capabilities(
        bits=(1, 2, 3, 4, 8),
        needs_calibration=False,
        devices=("cpu", "cuda"),
        serializable=True,
        peft_trainable=True,
        packages={"hqq": "hqq"},
        format="safetensors of hqq's HQQLinear state; reload with qtool.load() (not plain transformers)",
    )
    Options = HqqOptions

    def quantize(self, source, spec: QuantSpec, device: str) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        dtype = compute_dtype(device)
        model = source.load_model(device, dtype)
        config = BaseQuantizeConfig(
            nbits=spec.bits,
            group_size=None if spec.group_size == -1 else spec.group_size,
            quant_zero=False,
            quant_scale=False,
        )
        config["weight_quant_params"]["optimize"] = spec.options.optimize
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=dtype, device=device)
        return model

    def save(self, model: nn.Module, out: Path) -> None:
        state = model.state_dict()  # HQQLinear contributes its encoded (all-tensor) state
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.save_pretrained(out)
        _mark_config(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)

    def load(self, path: Path, device: str) -> nn.Module:
        from accelerate import init_empty_weights
        from hqq.core.quantize import HQQLinear
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = compute_dtype(device)
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = load_file(str(path / WEIGHTS_NAME), device=device)
        for name in sorted(k[: -len(".W_q")] for k in state if k.endswith(".W_q")):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child,
                    HQQLinear(None, None, compute_dtype=dtype, device=device, initialize=False))
        result = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"hqq checkpoint does not match its config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        model.tie_weights()
        return model.to(device).eval()

    def kernel(self, device: str) -> str:
        from hqq.core.quantize import HQQLinear

        return f"hqq {HQQLinear.backend.name.lower()} backend on {device} (dequantize per matmul)"

    def effective_bits(self, spec: QuantSpec) -> float:
        # scale and zero per group, stored in the compute dtype (fp32 on CPU, bf16 on CUDA)
        return float(spec.bits) if spec.group_size == -1 else spec.bits + 2 * 16 / spec.group_size


def _mark_config(out: Path) -> None:
    """Tag config.json so that plain transformers refuses it instead of loading random weights."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": "hqq", "loader": "qtool.load()"}
    path.write_text(json.dumps(config, indent=2) + "\n")
