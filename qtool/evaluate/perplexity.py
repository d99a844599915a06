"""Token perplexity and bits per byte, the way the GPTQ/AWQ papers measure it.

Protocol "token-ppl": the whole text is tokenised once (no special tokens added), cut into
windows of `ctx` tokens that start every `stride` tokens (stride = ctx: non-overlapping windows,
the GPTQ protocol). Each window scores only tokens no earlier window scored, and never its own
first token (it has no context). Trailing tokens that do not fill a window are dropped.

With BOS (qtool.bos: by default when the tokenizer adds one itself, e.g. Gemma), every window is
BOS followed by ctx - 1 text tokens, windows start every `stride` text tokens (default ctx - 1),
and the first text token of a window is scored too (BOS is its context; BOS itself never is).
The protocol is then named "token-ppl+bos". The GPTQ papers put BOS once before the whole text
(Llama's tokenizer adds it to the one encoding), so only their first window starts with it.
PPL = exp(sum of NLL / scored tokens); bpb = sum of NLL in bits / UTF-8 bytes of the scored tokens.
This is *token* perplexity: it depends on the tokenizer and is not lm-eval's word perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qtool.bos import BosRule, resolve_bos
from qtool.data import Text
from qtool.errors import DatasetError

PROTOCOL = "token-ppl"
PROTOCOL_BOS = "token-ppl+bos"


@dataclass(frozen=True)
class PerplexityResult:
    protocol: str
    ctx: int
    stride: int
    windows: int
    tokens_scored: int
    bytes_scored: int
    nll_sum: float  # nats
    ppl: float
    bpb: float
    dataset: dict[str, Any]
    seconds: float
    bos: dict[str, Any]  # qtool.bos.BosRule.record()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        from pathlib import Path

        return (f"  token PPL {self.ppl:.3f}, bits/byte {self.bpb:.4f} [{self.protocol}, ctx {self.ctx}, "
                f"stride {self.stride}, {self.tokens_scored} tokens scored, {Path(self.dataset.get('source') or self.dataset['origin']).name}]")


@dataclass(frozen=True)
class Tokens:
    ids: torch.Tensor  # (n,) int64
    nbytes: torch.Tensor  # (n,) UTF-8 bytes of the text each token covers


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> Tokens:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    nbytes = torch.tensor(_bytes_per_token(text, enc["offset_mapping"]), dtype=torch.long)
    if max_tokens is not None:
        ids, nbytes = ids[:max_tokens], nbytes[:max_tokens]
    return Tokens(ids, nbytes)


def _bytes_per_token(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes each token adds to the text, so that they sum to the text's bytes.

    Byte-level BPE splits a multi-byte character over several tokens whose offsets all cover it;
    the character's bytes go to the first of them (and any gap to the next token).
    """
    counts, covered = [], 0
    for _start, end in offsets:
        counts.append(len(text[covered:end].encode("utf-8")) if end > covered else 0)
        covered = max(covered, end)
    return counts


def window_plan(n_tokens: int, ctx: int, stride: int, bos: bool = False) -> list[tuple[int, int]]:
    """(start, first scored position) in text tokens for every window; see the module docstring.

    A window holds `ctx` tokens, BOS included when `bos`: ctx - 1 text tokens then, the first of
    them scored. Raises DatasetError for ctx < 2, a stride outside 1..text tokens per window, or a
    text shorter than one window.
    """
    if ctx < 2:
        raise DatasetError(f"ctx must be at least 2 tokens, got {ctx}")
    span = ctx - 1 if bos else ctx
    if not 1 <= stride <= span:
        limit = f"the {span} text tokens of a window (ctx {ctx} less BOS)" if bos else f"ctx ({ctx})"
        raise DatasetError(f"stride must be between 1 and {limit}, got {stride}")
    if n_tokens < span:
        raise DatasetError(f"the text has {n_tokens} tokens, fewer than one window of ctx={ctx}")
    plan, scored_until = [], 0
    for start in range(0, n_tokens - span + 1, stride):
        first = max(scored_until, start if bos else start + 1)
        plan.append((start, first))
        scored_until = start + span
    return plan


@dataclass(frozen=True)
class WindowedText:
    tokens: Tokens
    plan: list[tuple[int, int]]
    ctx: int
    stride: int
    dataset: dict[str, Any]  # the text's description plus the token cap, recorded with results
    bos: BosRule

    @property
    def span(self) -> int:
        """Text tokens per window: ctx, less one for BOS."""
        return self.ctx - len(self.bos.prefix)

    @property
    def protocol(self) -> str:
        return PROTOCOL_BOS if self.bos.prefix else PROTOCOL


def windowed(tokenizer: Any, text: Text, ctx: int, stride: int | None, max_tokens: int | None,
             bos: str = "auto") -> WindowedText:
    """Tokenise once and plan the windows; the same for every evaluator on this text.

    `bos` is a qtool.bos mode; `max_tokens` caps the text tokens (BOS not counted).
    """
    rule = resolve_bos(tokenizer, bos)
    span = ctx - len(rule.prefix)
    stride = span if stride is None else stride
    tokens = tokenize(tokenizer, text.content, max_tokens)
    return WindowedText(tokens, window_plan(len(tokens.ids), ctx, stride, bos=bool(rule.prefix)), ctx, stride,
                        {**text.describe(), "max_tokens": max_tokens}, rule)


@dataclass(frozen=True)
class ScoredWindow:
    logprobs: torch.Tensor  # (n, vocab) float32 log-probabilities at the n scored positions
    targets: torch.Tensor  # (n,) the tokens that actually came next
    nbytes: int  # UTF-8 bytes of those n tokens


def window_tokens(text: WindowedText, start: int, first: int) -> tuple[torch.Tensor, int]:
    """One planned window: its tokens (BOS prefix, then text tokens from `start`) and the window
    position of its first scored token. logits[i] predict window[i + 1]: the text tokens at absolute
    positions [first, start + span) sit at window positions [offset, ctx)."""
    prefix = torch.tensor(text.bos.prefix, dtype=torch.long)
    window = torch.cat([prefix, text.tokens.ids[start : start + text.span]])
    return window, first - start + len(prefix)


@torch.no_grad()
def scored_windows(model: torch.nn.Module, text: WindowedText) -> Iterator[ScoredWindow]:
    device = next(model.parameters()).device
    tokens, span = text.tokens, text.span
    for start, first in text.plan:
        window, offset = window_tokens(text, start, first)
        window = window.to(device)
        logits = model(window.unsqueeze(0)).logits[0].float()
        yield ScoredWindow(
            logprobs=F.log_softmax(logits[offset - 1 : -1], dim=-1),
            targets=window[offset:],
            nbytes=int(tokens.nbytes[first : start + span].sum()),
        )


class PerplexityMeter:
    """Accumulates NLL over scored windows; `result()` applies the protocol's formulas."""

    def __init__(self) -> None:
        self.nll_sum, self.tokens, self.nbytes, self.windows = 0.0, 0, 0, 0

    def add(self, window: ScoredWindow) -> None:
        self.nll_sum += -window.logprobs.gather(1, window.targets.unsqueeze(1)).sum().item()
        self.tokens += window.targets.numel()
        self.nbytes += window.nbytes
        self.windows += 1

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    def result(self, text: WindowedText, seconds: float) -> PerplexityResult:
        return PerplexityResult(
            protocol=text.protocol, ctx=text.ctx, stride=text.stride, windows=self.windows, tokens_scored=self.tokens,
            bytes_scored=self.nbytes, nll_sum=self.nll_sum, ppl=self.ppl,
            bpb=self.nll_sum / math.log(2) / max(self.nbytes, 1), dataset=text.dataset, seconds=round(seconds, 3),
            bos=text.bos.record(),
        )


def token_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: Text,
    ctx: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    bos: str = "auto",
) -> PerplexityResult:
    """Token perplexity of `model` on `text` under the module's protocol; `bos` is a qtool.bos mode.

    Raises DatasetError when the text holds less than one window, SpecError for a bad `bos`.
    """
    windows = windowed(tokenizer, text, ctx, stride, max_tokens, bos)
    started = time.perf_counter()
    meter = PerplexityMeter()
    for window in tqdm(scored_windows(model, windows), total=len(windows.plan), desc="perplexity",
                       unit="window", disable=not progress, leave=False):
        meter.add(window)
    return meter.result(windows, time.perf_counter() - started)
