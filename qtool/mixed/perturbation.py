"""The errors a plan's costs perturb the weights by: round-to-nearest, or the method's own.

`method`: the backend quantizes the whole model once per candidate width (uniform, same options,
same calibration), and each projection's error is its full-precision weight minus the weight the
quantized layer computes (read back through its kernel: qtool.export.gguf.projection_weights).
Error-compensating methods (GPTQ, AWQ) spread and shrink the error in ways round-to-nearest does
not show, so this ranks layers by what the method will actually do; it costs one quantization per
candidate width (SmolLM2-135M, gptq: ~100 s each on 2 cores).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from qtool.mixed.sensitivity import Errors, rtn_errors


def method_errors(source: Any, backend: Any, spec: Any, candidates: tuple[int, ...], calibration: Any,
                  device: str) -> Errors:
    """Errors[name, W, b] = W - (the weight of `name` after `backend` quantized the model to b bits)."""
    from qtool.backends.base import Quantized
    from qtool.export.gguf import projection_weights

    quantized: dict[int, dict[str, torch.Tensor]] = {}
    for bits in candidates:
        uniform = dataclasses.replace(spec, bits=bits, target=None, layer_bits=None)
        with tempfile.TemporaryDirectory(prefix="qtool-plan-") as tmp:
            result = backend.quantize(source, uniform, device, calibration)
            model = result.model if isinstance(result, Quantized) else result
            backend.save(model, Path(tmp))
            del model, result
            loaded = backend.load(Path(tmp), "cpu")
            quantized[bits] = {name: weight for name, (weight, _bias) in projection_weights(loaded).items()}
            del loaded

    def errors(name: str, weight: torch.Tensor, bits: int) -> torch.Tensor:
        return weight.detach().float().cpu() - quantized[bits][name]

    return errors


def perturbation_errors(kind: str, source: Any, backend: Any, spec: Any, candidates: tuple[int, ...],
                        calibration: Any, device: str) -> Errors:
    if kind == "method":
        return method_errors(source, backend, spec, candidates, calibration, device)
    return rtn_errors(spec.group_size)
