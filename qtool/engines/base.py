"""What every serving engine offers qtool: availability, loading a checkpoint, greedy tokens, speed.

An engine is how a deployment runs the checkpoint (transformers, vLLM, llama.cpp). qtool asks each
the same questions so that `qtool serve-check`, `qtool eval --engine` and compare reports put
numbers from different engines side by side with their engine, version, kernel, dtype and device
named (docs/engines.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EngineJob:
    """One request to an engine.

    model: a checkpoint folder, or a .gguf file for llama.cpp. prompts: token-id lists (the
    reference tokenizer's, so both sides see the same ids); new_tokens greedy tokens are generated
    for each, EOS ignored. speed: None, or {"batch": [1, 8], "prompt_ids": [...], "new_tokens": 32,
    "repeats": 3}. threads: CPU threads (None: the engine's default). max_model_len: KV cache length
    in tokens.
    """

    model: str
    prompts: list[list[int]]
    new_tokens: int
    max_model_len: int
    dtype: str = "auto"
    threads: int | None = None
    speed: dict[str, Any] | None = None
    compile: bool = False  # the engine's graph compilation (vLLM: torch.compile), as deployed
    windows: list[list[int]] | None = None  # token perplexity: windows, each from an empty KV cache
    scored_from: list[int] | None = None  # first scored position of each window


@dataclass
class EngineRun:
    """What an engine did with a job: its identity, the tokens, speed entries and peak memory.

    speed: one dict per batch size (batch, prompt_tokens, new_tokens, repeats, prefill_tokens_per_s,
    time_to_first_token_s and decode_tokens_per_s as {median, min, max}), or {"batch", "not_measured"}.
    peak_memory_mib: resident memory of the engine's process tree (CPU) over the whole run, MiB.
    """

    engine: str
    version: str
    device: str
    dtype: str
    kernel: str | None
    quantization: str | None
    threads: Any
    tokens: list[list[int]]
    mode: str | None = None  # how the engine ran the model (e.g. "torch.compile (vLLM default)")
    speed: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_mib: float | None = None
    peak_memory_kind: str = "rss of the engine's process tree"
    perplexity: dict[str, Any] | None = None  # {nll, tokens_scored, ppl, ctx} when the job had windows
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("tokens")
        return out

    def summary(self) -> str:
        head = (f"  [{self.engine} {self.version}, {self.device}, {self.dtype}, kernel {self.kernel or '?'}, "
                f"{self.mode or 'default mode'}, threads {self.threads}]")
        lines = [head]
        for s in self.speed:
            if "not_measured" in s:
                lines.append(f"  batch {s['batch']}: not measured ({s['not_measured']})")
                continue
            lines.append(f"  batch {s['batch']}: prefill {s['prefill_tokens_per_s']['median']:.0f} tok/s, decode "
                         f"{s['decode_tokens_per_s']['median']:.1f} tok/s (min {s['decode_tokens_per_s']['min']:.1f}, "
                         f"max {s['decode_tokens_per_s']['max']:.1f}), first token "
                         f"{1000 * s['time_to_first_token_s']['median']:.0f} ms, {s['prompt_tokens']}+"
                         f"{s['new_tokens']} tokens, median of {s['repeats']}")
        if self.perplexity:
            p = self.perplexity
            lines.append(f"  token perplexity {p['ppl']:.3f} over {p['tokens_scored']} tokens (ctx {p['ctx']}, "
                         f"{self.engine}'s logits)")
        if self.peak_memory_mib is not None:
            lines.append(f"  peak memory {self.peak_memory_mib:.0f} MiB ({self.peak_memory_kind})")
        return "\n".join(lines)


@dataclass
class EngineFailure:
    """An engine that could not load or run one checkpoint: recorded next to the others' numbers
    (a compare cell goes on: e.g. llama.cpp has no lossless GGUF for an hqq checkpoint)."""

    engine: str
    error: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return f"  [{self.engine}] not measured: {self.error}"


class Engine:
    """A serving engine. Subclasses set `name`, `summary`, `inputs` ("folder" or "gguf") and
    implement `unavailable` and `run`."""

    name: str = ""
    summary: str = ""
    inputs: str = "folder"
    setup_hint: str = ""
    scores_windows: bool = False  # computes token perplexity from EngineJob.windows

    def unavailable(self) -> str | None:
        """None when the engine can run here, else one line saying why not and how to fix it."""
        raise NotImplementedError

    def run(self, job: EngineJob) -> EngineRun:
        """Load job.model, generate, measure. Raises EngineError (one line) when it cannot."""
        raise NotImplementedError

    def checkpoint_for(self, path: Path) -> Path:
        """The file or folder this engine loads for a qtool checkpoint `path` (llama.cpp: its GGUF)."""
        return path

    def check_checkpoint(self, path: Path) -> None:
        """SpecError (one line) when this engine cannot take the checkpoint `path`, found from its
        files before any weight loads; nothing by default."""
