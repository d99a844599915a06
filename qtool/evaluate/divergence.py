"""How far a quantized model's next-token distribution moved from its base model's.

On the same windows as token perplexity (same text, ctx, stride, scored positions), both models
predict every scored position; per position we take KL(base || model) in nats and whether the
two argmax tokens agree. Reported: mean and 99th percentile of the KL, and the top-1 agreement.
KL catches damage that perplexity averages away (a model can keep its PPL while changing many
individual predictions). Base vs itself gives exactly 0 KL and 100 % agreement.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from qtool.data import Text
from qtool.errors import QtoolError
from qtool.evaluate.perplexity import PerplexityMeter, PerplexityResult, scored_windows, windowed

PROTOCOL = "next-token KL(base || model) and top-1 agreement on the token-ppl windows"


@dataclass(frozen=True)
class DivergenceResult:
    protocol: str
    base: str
    tokens: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    base_ppl: float  # the base model's token PPL on the same windows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"  vs {self.base}: KL mean {self.kl_mean:.4f} nats, p99 {self.kl_p99:.4f}, "
                f"top-1 agreement {100 * self.top1_agreement:.2f} % (base PPL {self.base_ppl:.3f})")


def perplexity_and_divergence(
    model: torch.nn.Module,
    base: torch.nn.Module,
    base_name: str,
    tokenizer: Any,
    text: Text,
    ctx: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    bos: str = "auto",
) -> tuple[PerplexityResult, DivergenceResult]:
    """One pass over the windows: the model's perplexity and its divergence from `base`.

    Both models see the same windows (`bos`: a qtool.bos mode, resolved with the model's tokenizer).
    """
    windows = windowed(tokenizer, text, ctx, stride, max_tokens, bos)
    started = time.perf_counter()
    meter, base_meter = PerplexityMeter(), PerplexityMeter()
    kl_parts, agree, total = [], 0, 0
    pairs = zip(scored_windows(model, windows), scored_windows(base, windows), strict=True)
    for ours, theirs in tqdm(pairs, total=len(windows.plan), desc="perplexity + KL", unit="window", disable=not progress, leave=False):
        if ours.logprobs.shape != theirs.logprobs.shape:
            raise QtoolError(
                f"the base model predicts over {theirs.logprobs.shape[-1]} tokens and the model over"
                f" {ours.logprobs.shape[-1]}: KL needs the same vocabulary"
            )
        meter.add(ours)
        base_meter.add(theirs)
        theirs_lp = theirs.logprobs.to(ours.logprobs.device)
        kl_parts.append((theirs_lp.exp() * (theirs_lp - ours.logprobs)).sum(-1).clamp(min=0).cpu())
        agree += int((theirs_lp.argmax(-1) == ours.logprobs.argmax(-1)).sum())
        total += ours.targets.numel()
    kl = torch.cat(kl_parts).double()
    perplexity = meter.result(windows, time.perf_counter() - started)
    divergence = DivergenceResult(
        protocol=PROTOCOL,
        base=base_name,
        tokens=total,
        kl_mean=kl.mean().item(),
        kl_p99=torch.quantile(kl, 0.99).item(),
        kl_max=kl.max().item(),
        top1_agreement=agree / total,
        base_ppl=base_meter.ppl,
    )
    return perplexity, divergence
