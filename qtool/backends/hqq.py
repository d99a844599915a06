"""HQQ (half-quadratic quantization): calibration-free 1-8 bit weights, through hqq's own API.

transformers 5 removed HqqConfig, so qtool calls `AutoHQQHFModel.quantize_model` itself.
hqq saves with torch.save (a pickle); qtool instead writes the HQQLinear state dicts, which hqq
encodes as plain tensors, to safetensors, and rebuilds the model from config + those tensors:
loading a qtool hqq checkpoint never unpickles anything.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qtool.backends import register
from qtool.backends._state import load_state_checkpoint, save_state_checkpoint, write_state_config
from qtool.backends.base import Backend, Capabilities, QuantSpec
from qtool.runtime import compute_dtype


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
    mixed_bits = (2, 3, 4, 8)
    stored_tensors_per_layer = 19  # W_q, scale, zero and hqq's 16 metadata entries (shape, nbits, ...)
    streams = True

    def quantize(self, source, spec: QuantSpec, device: str, calibration=None) -> nn.Module:
        from hqq.models.hf.base import AutoHQQHFModel

        dtype = compute_dtype(device)
        model = source.load_model(device, dtype)
        if spec.layer_bits:  # hqq's quantize_model takes one config per layer *type* (q_proj, ...), not per layer
            return self.quantize_linears(model, spec, device)
        with labelled_hqq_bars():
            AutoHQQHFModel.quantize_model(model, quant_config=hqq_config(spec, spec.bits), compute_dtype=dtype,
                                          device=device)
        return model

    def layer_bytes(self, spec: QuantSpec, out_features: int, in_features: int) -> int:
        """hqq's packing (2/4/8 bits in uint8, 3 bits ten per int32) and a scale and zero per group in
        the compute dtype (fp32 on CPU, bf16 on CUDA; the plan counts fp32)."""
        numel = out_features * in_features
        codes = math.ceil(numel / 10) * 4 if spec.bits == 3 else math.ceil(numel * spec.bits / 8)
        groups = out_features if spec.group_size == -1 else numel // spec.group_size
        return codes + groups * 2 * 4 + 16 * 8  # the metadata entries' own bytes

    def quantize_layer(self, name: str, linear: nn.Linear, spec: QuantSpec, device: str) -> nn.Module:
        from hqq.core.quantize import HQQLinear

        return HQQLinear(linear, hqq_config(spec, spec.bits_of(name)), compute_dtype=compute_dtype(device),
                         device=device, del_orig=True)

    def save(self, model: nn.Module, out: Path) -> None:
        save_state_checkpoint(model, out, quant_method="hqq")

    def write_config(self, config: Any, generation_config: Any, out: Path) -> None:
        write_state_config(config, generation_config, out, quant_method="hqq")

    def load(self, path: Path, device: str) -> nn.Module:
        from hqq.core.quantize import HQQLinear

        dtype = compute_dtype(device)
        return load_state_checkpoint(
            path, device, dtype, marker="W_q",
            make_layer=lambda _linear: HQQLinear(None, None, compute_dtype=dtype, device=device, initialize=False),
        )

    def kernel(self, device: str) -> str:
        from hqq.core.quantize import HQQLinear

        return f"hqq {HQQLinear.backend.name.lower()} backend on {device} (dequantize per matmul)"

    def effective_bits(self, spec: QuantSpec) -> float:
        # scale and zero per group, stored in the compute dtype (fp32 on CPU, bf16 on CUDA)
        return float(spec.bits) if spec.group_size == -1 else spec.bits + 2 * 16 / spec.group_size


def hqq_config(spec: QuantSpec, bits: int) -> dict[str, Any]:
    from hqq.core.quantize import BaseQuantizeConfig

    config = BaseQuantizeConfig(nbits=bits, group_size=None if spec.group_size == -1 else spec.group_size,
                                quant_zero=False, quant_scale=False)
    config["weight_quant_params"]["optimize"] = spec.options.optimize
    return config


@contextlib.contextmanager
def labelled_hqq_bars() -> Iterator[None]:
    """hqq draws two unlabelled bars per quantize_model and has no switch for them: give them a
    label, and hide them when progress is off (TQDM_DISABLE, which `--quiet` sets)."""
    import hqq.models.base as hqq_base
    from tqdm.auto import tqdm

    original = hqq_base.tqdm
    off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    labels = iter(["hqq: other layers", "hqq: quantize linear layers"])

    def bar(iterable: Any, **kwargs: Any) -> Any:
        return tqdm(iterable, **{**kwargs, "disable": off or kwargs.get("disable", False),
                                 "desc": next(labels, "hqq"), "unit": "module"})

    hqq_base.tqdm = bar
    try:
        yield
    finally:
        hqq_base.tqdm = original
