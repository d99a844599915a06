"""Generation speed: prefill throughput, time to first token, decode throughput, per batch size.

Each measurement: a fixed prompt cut from real text (the same tokens in every row of a batch),
one warm-up run, then `repeats` timed runs; median, min and max are reported. Decode is a greedy
loop over the model's own KV cache (HF forward with past_key_values), one token per row per
step, so decode tokens/s = batch * new tokens / decode time. Wall-clock numbers belong in
benchmarks and reports, never in test assertions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.evaluate.memory import peak_memory


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class SpeedResult:
    device: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: Spread
    time_to_first_token_s: Spread
    decode_tokens_per_s: Spread
    peak_memory_prefill_mib: float
    peak_memory_generate_mib: float
    peak_memory_kind: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def greedy_run(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds including the first token, decode seconds for the rest, the new tokens)."""
    _sync(device)
    start = time.perf_counter()
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    past, tokens = out.past_key_values, [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    _sync(device)
    return prefill, time.perf_counter() - start, torch.cat(tokens, dim=1)


def measure_speed(
    model: nn.Module, prompt_ids: torch.Tensor, batch: int, new_tokens: int = 32, repeats: int = 3
) -> SpeedResult:
    if new_tokens < 2 or batch < 1 or repeats < 1:
        raise QtoolError("speed needs --new-tokens >= 2 (the first comes from prefill), batch >= 1, repeats >= 1")
    device = next(model.parameters()).device.type
    prompt = prompt_ids.to(next(model.parameters()).device).unsqueeze(0).repeat(batch, 1)
    greedy_run(model, prompt, new_tokens, device)  # warm-up: allocator, kernels, caches
    with peak_memory(device) as prefill_peak:
        greedy_run(model, prompt, 2, device)  # prefill and a single decode step
    with peak_memory(device) as generate_peak:
        runs = [greedy_run(model, prompt, new_tokens, device)[:2] for _ in range(repeats)]
    prompt_tokens = prompt.shape[1]
    return SpeedResult(
        device=device,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tokens_per_s=Spread.of([batch * prompt_tokens / p for p, _ in runs]),
        time_to_first_token_s=Spread.of([p for p, _ in runs]),
        decode_tokens_per_s=Spread.of([batch * (new_tokens - 1) / d for _, d in runs]),
        peak_memory_prefill_mib=round(prefill_peak.mib, 1),
        peak_memory_generate_mib=round(generate_peak.mib, 1),
        peak_memory_kind=prefill_peak.kind,
    )
