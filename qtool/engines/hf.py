"""transformers, in qtool's own process: the reference every other engine is compared with.

Greedy tokens from a plain KV-cache loop (qtool.evaluate.speed.greedy_run, EOS ignored), for
serve-check. Its speed is `qtool eval --speed`'s own path (qtool.api.evaluate_speed), so this
engine does not measure speed itself.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from tqdm.auto import tqdm

from qtool.engines.base import Engine, EngineJob, EngineRun


class HfEngine(Engine):
    name = "hf"
    summary = "transformers eager loop in qtool's process (the reference)"

    def unavailable(self) -> str | None:
        return None

    def run(self, job: EngineJob, loaded: Any = None) -> EngineRun:
        import transformers

        from qtool import api
        from qtool.evaluate.speed import greedy_run

        loaded = loaded or api.load(job.model, "cpu")
        model = loaded.model
        device = next(model.parameters()).device
        tokens = [greedy_run(model, torch.tensor([p], device=device), job.new_tokens, device.type)[2][0].tolist()
                  for p in tqdm(job.prompts, desc="transformers: greedy", unit="prompt", leave=False)]
        return EngineRun(
            engine="hf", version=transformers.__version__, device=device.type, dtype=str(model_dtype(model)),
            kernel=linear_kernels(model), quantization=(loaded.record or {}).get("method"),
            threads=torch.get_num_threads(), tokens=tokens, mode="eager (transformers)", peak_memory_kind="",
            model=job.model,
        )


def model_dtype(model: torch.nn.Module) -> str:
    """The compute dtype: the first floating-point parameter's (quantized layers hold int tensors)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "?"


def linear_kernels(model: torch.nn.Module) -> str:
    """The module classes that compute the decoder's projections, e.g. "TorchQuantLinear ×210"."""
    from qtool.models import projection_modules

    counts = Counter(type(m).__name__ for m in projection_modules(model).values())
    return ", ".join(f"{k} ×{v}" for k, v in counts.most_common()) or type(model).__name__
