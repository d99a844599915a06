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

    def summary(self) -> str:
        s = self
        return (f"  batch {s.batch}: prefill {s.prefill_tokens_per_s.median:.0f} tok/s, decode "
                f"{s.decode_tokens_per_s.median:.1f} tok/s (min {s.decode_tokens_per_s.min:.1f}, max "
                f"{s.decode_tokens_per_s.max:.1f}), first token {1000 * s.time_to_first_token_s.median:.0f} ms, "
                f"peak {s.peak_memory_generate_mib:.0f} MiB [{s.device}, transformers eager generate loop, "
                f"{s.prompt_tokens}+{s.new_tokens} tokens, median of {s.repeats}]")


@dataclass(frozen=True)
class SpeedNotMeasured:
    """A batch size whose speed was deliberately not timed, and why (the record engines write too:
    {"batch", "not_measured"}). transformers only emulates some formats (FP8, W8A8, FP4 in
    compressed-tensors on CPU: weights decompressed, activations quantize-dequantized), so its
    timings of them would be reported as the format's speed while measuring something else."""

    batch: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "not_measured": self.reason}

    def summary(self) -> str:
        return f"  batch {self.batch}: speed not measured: {self.reason}"


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


@dataclass(frozen=True)
class StaticDecodeResult:
    """Decode speed over a pre-allocated (static) KV cache, one greedy token per row per step.

    `mode` is "cuda-graph" when each step replayed one captured CUDA graph, "eager" otherwise;
    `fallback_reason` says why a requested graph was not used. `tokens` are the greedy tokens of
    the first row (for checking that modes agree).
    """

    device: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    mode: str
    fallback_reason: str | None
    decode_tokens_per_s: Spread
    step_ms: Spread
    peak_memory_mib: float
    peak_memory_kind: str
    tokens: list[int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StaticDecoder:
    """Greedy decoding with transformers' StaticCache and, on CUDA, one captured graph per step.

    A decode step has fixed shapes and fixed tensor addresses: the current token, its position,
    an additive 4-D attention mask over the whole cache (transformers uses a 4-D mask as given),
    and the cache itself. The step writes the next token, advances the position and opens the
    mask for the new slot, all on the device, so a CUDA graph of it (torch.cuda.CUDAGraph)
    replays without host work. This is the decode loop that `torch.compile(mode="reduce-overhead")`
    would build; it is written out because that path failed under transformers 5.17 (FACTS.md).
    Shapes: prompt [batch, prompt_tokens] int64; cache length prompt_tokens + new_tokens.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
        from transformers import StaticCache

        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.device = prompt.device
        batch, length = prompt.shape
        self.max_len = length + new_tokens
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.mask = torch.full((batch, 1, 1, self.max_len), torch.finfo(dtype).min, dtype=dtype, device=self.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(batch, self.max_len, dtype=torch.long, device=self.device)
        self.graph: Any = None

    @torch.no_grad()
    def prefill(self) -> None:
        """Run the prompt through the model into the cache; set the state for the first decode step."""
        self.cache.reset()
        batch, length = self.prompt.shape
        positions = torch.arange(length, device=self.device)
        logits = self.model(input_ids=self.prompt, position_ids=positions.expand(batch, -1),
                            cache_position=positions, past_key_values=self.cache, use_cache=True).logits
        self.mask.fill_(torch.finfo(self.mask.dtype).min)
        self.mask[..., :length] = 0
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(length)
        self.cache_position.fill_(length)
        self.out.zero_()

    def _step(self) -> None:
        self.mask.index_fill_(-1, self.cache_position, 0)
        self.out.index_copy_(1, self.cache_position, self.token)
        logits = self.model(input_ids=self.token, position_ids=self.position, cache_position=self.cache_position,
                            past_key_values=self.cache, attention_mask=self.mask, use_cache=True).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)
        self.cache_position.add_(1)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture one decode step as a CUDA graph (after warm-up steps on a side stream).

        Raises what torch raises when the step cannot be captured (a host sync inside a kernel
        library, a CPU tensor): callers fall back to eager steps.
        """
        self.prefill()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # allocator and library warm-up; the state is reset by prefill()
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.prefill()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    @torch.no_grad()
    def decode(self) -> list[int]:
        """Run new_tokens - 1 decode steps after prefill(); return row 0's generated tokens."""
        for _ in range(self.new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        self.out.index_copy_(1, self.cache_position, self.token)
        length = self.prompt.shape[1]
        return self.out[0, length:length + self.new_tokens].tolist()


def measure_static_decode(
    model: nn.Module, prompt_ids: torch.Tensor, batch: int, new_tokens: int = 64, repeats: int = 3,
    cuda_graph: bool = True,
) -> StaticDecodeResult:
    """Decode tokens/s over a static KV cache (StaticDecoder), CUDA-graphed where possible.

    prompt_ids: [prompt_tokens] int64, repeated for each of `batch` rows. Each repeat re-runs the
    prefill (not timed) and times new_tokens - 1 decode steps. decode tokens/s = batch *
    (new_tokens - 1) / seconds. Raises QtoolError for new_tokens < 2, batch or repeats < 1.
    """
    if new_tokens < 2 or batch < 1 or repeats < 1:
        raise QtoolError("static decode needs new_tokens >= 2, batch >= 1, repeats >= 1")
    first = next(model.parameters()).device
    device = first.type
    prompt = prompt_ids.to(first).unsqueeze(0).repeat(batch, 1)
    decoder = StaticDecoder(model, prompt, new_tokens)
    reason = None
    if cuda_graph and device == "cuda":
        try:
            decoder.capture()
        except Exception as exc:  # any capture failure means: measure eager steps instead
            decoder.graph = None
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            torch.cuda.synchronize()
    elif cuda_graph:
        reason = f"CUDA graphs need a CUDA device (ran on {device})"
    if decoder.graph is None:
        decoder.prefill()
        decoder.decode()  # warm-up: allocator, kernel libraries (capture() warmed up the graph's)
    seconds, tokens = [], []
    with peak_memory(device) as peak:
        for _ in range(repeats):
            decoder.prefill()
            _sync(device)
            start = time.perf_counter()
            tokens = decoder.decode()
            _sync(device)
            seconds.append(time.perf_counter() - start)
    steps = new_tokens - 1
    return StaticDecodeResult(
        device=device, batch=batch, prompt_tokens=prompt.shape[1], new_tokens=new_tokens, repeats=repeats,
        mode="cuda-graph" if decoder.graph is not None else "eager", fallback_reason=reason,
        decode_tokens_per_s=Spread.of([batch * steps / s for s in seconds]),
        step_ms=Spread.of([1000 * s / steps for s in seconds]),
        peak_memory_mib=round(peak.mib, 1), peak_memory_kind=peak.kind, tokens=tokens,
    )
