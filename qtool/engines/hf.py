"""transformers, in qtool's own process: the reference every other engine is compared with.

Greedy tokens from a plain KV-cache loop (qtool.evaluate.speed.greedy_run, EOS ignored) and speed
from qtool.evaluate.speed.measure_speed: the eager path that `qtool eval --speed` always had.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from qtool.engines.base import Engine, EngineJob, EngineRun


class HfEngine(Engine):
    name = "hf"
    summary = "transformers eager loop in qtool's process (the reference)"

    def unavailable(self) -> str | None:
        return None

    def run(self, job: EngineJob, loaded: Any = None) -> EngineRun:
        import transformers

        from qtool import api
        from qtool.evaluate.speed import greedy_run, measure_speed

        loaded = loaded or api.load(job.model, "cpu")
        model = loaded.model
        device = next(model.parameters()).device
        tokens = [greedy_run(model, torch.tensor([p], device=device), job.new_tokens, device.type)[2][0].tolist()
                  for p in job.prompts]
        speed = []
        if job.speed:
            ids = torch.tensor(job.speed["prompt_ids"])
            speed = [measure_speed(model, ids, b, job.speed["new_tokens"], job.speed["repeats"]).as_dict()
                     for b in job.speed["batch"]]
        return EngineRun(
            engine="hf", version=transformers.__version__, device=device.type, dtype=str(model_dtype(model)),
            kernel=linear_kernels(model), quantization=(loaded.record or {}).get("method"),
            threads=torch.get_num_threads(), tokens=tokens, mode="eager (transformers)", speed=speed,
            peak_memory_mib=max((s["peak_memory_generate_mib"] for s in speed), default=None),
            peak_memory_kind=speed[0]["peak_memory_kind"] if speed else "", model=job.model,
        )


def model_dtype(model: torch.nn.Module) -> str:
    """The compute dtype: the first floating-point parameter's (quantized layers hold int tensors)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "?"


def linear_kernels(model: torch.nn.Module) -> str:
    """The module classes that compute the decoder's projections, e.g. "TorchQuantLinear ×210"."""
    counts = Counter(type(m).__name__ for name, m in model.named_modules()
                     if name.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"})
    return ", ".join(f"{k} ×{v}" for k, v in counts.most_common()) or type(model).__name__
